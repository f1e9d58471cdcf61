"""JWT-SVIDs (SPIFFE JWT-SVID spec): mint and validate."""

from custos.jwtsvid import errors, jwtsvid
from custos.jwtsvid.errors import *  # noqa: F403 -- exactly errors.__all__
from custos.jwtsvid.jwtsvid import *  # noqa: F403 -- exactly jwtsvid.__all__

# The package exports what its modules export, listed once in each module.
__all__ = list(errors.__all__)
__all__ += jwtsvid.__all__
