"""Owned by the entries helper (see /work/briefs/issue8-contract.md); replaced in full."""


class ChangeEvents:
    pass
