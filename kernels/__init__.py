"""Hot paths of the engine: Triton kernels beside torch references with the same signatures.

CUDA tensors use Triton; CPU tensors use the reference; BSTAR_KERNELS=triton|torch forces one.
"""

from kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from kernels.norm_rope import apply_rotary, apply_rotary_ref, rms_norm, rms_norm_ref
from kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from kernels.prm_scoring import prm_step_scores, prm_step_scores_ref
from kernels.sampling import sample, sample_ref

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "sample",
    "sample_ref",
    "prm_step_scores",
    "prm_step_scores_ref",
    "rms_norm",
    "rms_norm_ref",
    "apply_rotary",
    "apply_rotary_ref",
]
