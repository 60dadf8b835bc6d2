"""The engine: sequences, the scheduler that batches them, and the runners that run the model.

`Engine.step()` is the one generation loop of torchless: the library (`LLM`), the server and
every parallel mode run on it. See docs/ARCHITECTURE.md for how a token flows through it.
"""

from .engine import Engine, Event
from ..model.runner import Runner, make_runner
from .scheduler import Scheduler
from .sequence import Sequence

__all__ = ["Engine", "Event", "Runner", "Scheduler", "Sequence", "make_runner"]
