"""relex: extrapolate RLVR runs from a short prefix of checkpoints, exactly and in bounded memory.

    traj = Trajectory.discover("base/", "run/")
    extrapolate(Relex(rank=1, cutoff=75).fit(traj), "out/", targets=[500])
"""

from relex.errors import RelexError
from relex.materialize import compute_stats, extrapolate
from relex.methods import METHODS, AlphaRL, DirectMethod, ExPO, Method, NExt, Reconstruct, Relex, TwoPoint
from relex.trajectory import Trajectory
from relex.version import __version__

__all__ = ["METHODS", "AlphaRL", "DirectMethod", "ExPO", "Method", "NExt", "Reconstruct", "Relex", "RelexError",
           "Trajectory", "TwoPoint", "__version__", "compute_stats", "extrapolate"]
