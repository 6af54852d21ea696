"""The engine's working memory of one replica: what it needs on its GPUs besides the weights.

Pure arithmetic from an :class:`~search_spaces.Arch` (no torch), so ``rayprune plan`` and
``cluster.gpus_per_actor: auto`` can size a replica before anything loads. Each part follows what
the code allocates (SPEC §8 gives the figures for Llama-2-70B):

* **kept streams** (``actors/engine.py``): within a step the engine keeps, for one calibration batch,
  the residual stream entering every block where some mask diverges: at most ``2L + 1`` tensors of
  ``batch x tokens x hidden`` in the model's dtype (entering each of the ``2L`` blocks, and the final
  stream). Each lives on the device of the layer that made it, so they spread with the layers.
* **temporaries** of one block, per concurrent candidate stream: the running stream plus the larger of
  the MLP's (gate, up and their product: ``3 x batch x tokens x intermediate``) and attention's
  (q, k, v and its output). Attention scores (``tokens x tokens``) are not counted: SDPA's flash and
  memory-efficient kernels on CUDA never materialise them.
* **loss**: the LM head runs over ``LOSS_CHUNK_TOKENS`` tokens at a time: logits in the dtype, their
  fp32 copy and the fp32 log-softmax of one chunk.
* **SPRINT** (``actors/sprint.py``, :func:`sprint_memory`): streams of *all* calibration windows (one
  such stream: windows x tokens x hidden), in the memo of checkpointed states and in what a step keeps
  for itself, and the refits: ``top_k`` float64 accumulators of ``w x w + w x H`` and one float64
  Cholesky solve at a time (about four ``w x w`` float64 matrices), none of it on the device when the
  accumulators exceed ``checkpoint_budget`` (the actor then keeps the sums and solves in host memory;
  the products are still computed on the GPU). Checkpoints that spill to host memory do not count:
  ``checkpoint_budget`` caps the memo at what stays on the device (None: all of it does).
  SPRINT's per-batch streams (the running stream, the branches of the candidates in flight and, with
  the ``window`` reference, their references) are counted by the kept streams above, which they do
  not outnumber unless a run of about L consecutive MLP blocks is removed.

Temporaries, loss and refits may run on any GPU of a replica (``anywhere``); streams and checkpoints
follow the layers (``per_layer``: one share per decoder layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .arch import Arch

#: Mirrors ``actors.forward.LOSS_CHUNK_TOKENS`` (tokens per chunk of LM head + cross-entropy).
LOSS_CHUNK_TOKENS = 512
#: Bytes per element of each dtype rayprune loads (``auto`` on a GPU is bf16 or fp16: 2 bytes).
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1 << 30


def dtype_bytes(dtype: str, *, on_gpu: bool = True) -> int:
    """Bytes per element of the ``dtype`` setting; ``auto`` is 2 on a GPU (bf16 or fp16), 4 on a CPU."""
    if dtype == "auto":
        return 2 if on_gpu else 4
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one rayprune loads; use auto, {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class SprintMemory:
    """What SPRINT's steps add (see the module docstring); all in bytes."""

    checkpoints: int  # the memo of states kept on the device (the dense model's among them: refit_target dense)
    step_streams: int  # the most a step keeps besides the memo, at the peak of its phases
    refits: int  # top_k float64 accumulators + one float64 solve


@dataclass(frozen=True)
class WorkingMemory:
    """The working memory of one replica, by part, in bytes (see the module docstring)."""

    kept_streams: int
    temporaries: int
    loss: int
    sprint: SprintMemory | None = None
    num_layers: int = 1

    @property
    def anywhere(self) -> int:
        """Bytes any GPU of the replica may need at once: temporaries, loss and SPRINT's refits."""
        return self.temporaries + self.loss + (self.sprint.refits if self.sprint else 0)

    @property
    def following_layers(self) -> int:
        """Bytes that live with the layers that made them: kept streams and SPRINT's stored streams."""
        extra = self.sprint.checkpoints + self.sprint.step_streams if self.sprint else 0
        return self.kept_streams + extra

    @property
    def per_layer(self) -> float:
        """:attr:`following_layers` per decoder layer (what each layer on a GPU brings along)."""
        return self.following_layers / self.num_layers

    @property
    def total(self) -> int:
        return self.anywhere + self.following_layers

    def parts(self) -> dict[str, int]:
        """The named parts, for printing (SPRINT's only when it runs)."""
        named = {"kept streams": self.kept_streams, "block temporaries": self.temporaries, "loss chunk": self.loss}
        if self.sprint:
            named |= {"SPRINT checkpoints": self.sprint.checkpoints, "SPRINT step streams": self.sprint.step_streams,
                      "SPRINT refits": self.sprint.refits}
        return named

    def describe(self) -> str:
        """``20.1 GiB (kept streams 20.1 GiB, ...)``: the total and its non-zero parts."""
        return f"{human_bytes(self.total)} ({', '.join(f'{k} {human_bytes(v)}' for k, v in self.parts().items() if v)})"


def human_bytes(n: float) -> str:
    """``128.5 GiB``, ``448.0 MiB``, ``12.0 KiB``: binary units, one decimal."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def working_memory(arch: Arch, *, batch_size: int, tokens: int, element_bytes: int, streams: int = 1,
                   sprint: bool = False, windows: int = 0, top_k: int = 5, checkpoint_every: int | None = None,
                   max_states: int = 3, store_bytes: int = 2 << 30, checkpoint_budget: int | None = None,
                   refit_target: str = "local", reference: str = "window") -> WorkingMemory:
    """The working memory of a replica of ``arch`` scoring batches of ``batch_size`` x ``tokens``.

    ``element_bytes``: the dtype's (2 for bf16/fp16, 4 for fp32); ``streams``: concurrent candidate
    streams (1 on a GPU). With ``sprint``, ``windows`` is the number of calibration windows (SPRINT
    keeps streams of all of them), ``top_k`` the refits per step, ``checkpoint_every`` the layers
    between checkpoints (None: ``L // 4``), ``max_states`` the memo's states, ``store_bytes`` the cap
    of what a step keeps, ``checkpoint_budget`` the most the memo keeps on the device, and
    ``refit_target`` / ``reference`` those of ``search.sprint`` (:func:`sprint_memory`).
    """
    if min(batch_size, tokens, element_bytes, streams) < 1:
        raise ValueError("batch_size, tokens, element_bytes and streams must be positive")
    L, H, I = arch.num_layers, arch.hidden_size, arch.intermediate_size
    rows = batch_size * tokens
    stream = rows * H * element_bytes  # one residual stream of one batch
    kept = (arch.num_blocks + 1) * stream
    mlp = 3 * rows * I * element_bytes
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    attn = rows * (2 * q + 2 * kv) * element_bytes
    temporaries = streams * (stream + max(mlp, attn))
    loss = min(LOSS_CHUNK_TOKENS, rows) * arch.vocab_size * (element_bytes + 4 + 4)
    extra = None
    if sprint:
        extra = sprint_memory(arch, windows=windows, tokens=tokens, element_bytes=element_bytes, top_k=top_k,
                              checkpoint_every=checkpoint_every, max_states=max_states, store_bytes=store_bytes,
                              checkpoint_budget=checkpoint_budget, refit_target=refit_target, reference=reference)
    return WorkingMemory(kept, temporaries, loss, extra, L)


def sprint_memory(arch: Arch, *, windows: int, tokens: int, element_bytes: int, top_k: int = 5,
                  checkpoint_every: int | None = None, max_states: int = 3, store_bytes: int = 2 << 30,
                  checkpoint_budget: int | None = None, refit_target: str = "local",
                  reference: str = "window") -> SprintMemory:
    """What SPRINT's steps keep on a replica's GPUs, counted as ``actors/sprint.py`` allocates it.

    In streams of all windows (``windows x tokens x hidden`` each), with ``C`` checkpoints per state
    (``ceil(L / checkpoint_every)``), ``F = 2L + 1`` streams entering every block and the end, and
    ``S`` the store (``store_bytes``, or ``checkpoint_budget`` when smaller):

    * a step's walk records ``R`` streams, every entering stream when ``F`` of them fit ``S`` (for
      the refits; ``E = F - C`` of them stay beside the memo until the step ends), else ``C``;
    * the memo holds ``max_states`` states of ``C`` streams; with ``refit_target: dense`` one of
      them is the dense model's, walked once with ``D`` streams (``F`` when they fit ``S``, else
      ``C``) and reused by every step; ``refit_target: local`` (SPRINT's) has no dense walk;
    * the refits keep a branch of every window for the ``j`` refits whose two streams fit ``S``
      (``j <= top_k``): the stream without the candidate and the reference after the target, which
      with ``reference: current`` is a view of the kept every-block streams (none kept: a new one);
      the ``window`` reference runs blocks again, a new stream.

    The peak is the largest of three moments of a step: the walk's end (memo + R), the dense walk
    (a memo of ``max_states`` checkpointed states + E + D) and the refits (memo + E + branches, + C
    when a one-state memo gave the step's own place to the dense state); ``checkpoints`` is the
    memo, ``step_streams`` the rest of that peak (tests/actors/test_sprint_memory.py measures both).
    """
    if windows < 1:
        raise ValueError("SPRINT keeps streams of every calibration window: give windows >= 1")
    if max_states < 1:
        raise ValueError(f"max_states {max_states} is not a positive number of memo states; use e.g. 3")
    if refit_target not in ("local", "dense"):
        raise ValueError(f"refit_target {refit_target!r} is not one of local, dense (search.sprint.refit_target)")
    if reference not in ("window", "current"):
        raise ValueError(f"reference {reference!r} is not one of window, current (search.sprint.reference)")
    L, H, I = arch.num_layers, arch.hidden_size, arch.intermediate_size
    stream = windows * tokens * H * element_bytes  # one stream of every window
    store = store_bytes if checkpoint_budget is None else min(store_bytes, checkpoint_budget)
    checkpoints = math.ceil(L / (checkpoint_every or max(1, L // 4)))
    every_block = arch.num_blocks + 1
    keep_all = every_block * stream <= store
    walked = every_block if keep_all else checkpoints
    beside = every_block - checkpoints if keep_all else 0
    dense = walked if refit_target == "dense" else 0
    fitting = min(top_k, store // (2 * stream))  # refits whose branches are kept
    branches = fitting * (1 if reference == "current" and keep_all else 2)

    def capped(n: int) -> int:
        return n * stream if checkpoint_budget is None else min(n * stream, checkpoint_budget)

    memo = capped(max_states * checkpoints + (dense - checkpoints if dense else 0))
    own = checkpoints if dense and max_states == 1 else 0  # the dense state took the step's own place
    peak = max(memo + walked * stream, capped(max_states * checkpoints) + (beside + dense) * stream,
               memo + (own + beside + branches) * stream)
    refits = top_k * (I * I + I * H) * 8 + 4 * I * I * 8
    if checkpoint_budget is not None and top_k * (I * I + I * H) * 8 > checkpoint_budget:
        refits = 0  # the actor keeps such sums (and solves them) in host memory (actors/sprint.py)
    return SprintMemory(memo, peak - memo, refits)
