"""The custos server (issue 8): the datastore first (:mod:`custos.server.datastore`)."""
