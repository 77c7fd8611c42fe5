"""The SFT loss: next-token cross-entropy over the target positions, with the LM head in chunks.

`sft_loss_sum(model, mb, ce_chunk)` runs the decoder (`model.model`), keeps the hidden rows whose target
is not IGNORE, and sums their cross-entropies. With `ce_chunk` (the trainer's default, 1024 rows) the head
and the loss run in `ChunkedLinearCrossEntropy`, so no [rows, vocab] float32 logits exist: at most one
chunk's logits (and their float32 softmax) at a time, plus a float32 accumulator for the head's gradient
in backward. Without it, the plain path: `lm_head` on all rows, float32 logits, `F.cross_entropy`.

Under FSDP2 the head's weight is a sharded DTensor outside the root module's forward; the trainer
therefore calls this function as a registered FSDP forward method of the root
(`torch.distributed.fsdp.register_fsdp_forward_method`), so the root's parameters (embeddings, final
norm, lm_head) are unsharded while it runs and FSDP reduces the head's gradient in backward.

Math (per chunk of rows h [c, d], weight W [V, d], targets y, valid mask m, upstream gradient g):
    z = h W^T;  lse = logsumexp(z);  loss = sum_i m_i (lse_i - z_{i, y_i})
    G = g m_i (softmax(z_i) - onehot(y_i));  dh = G W;  dW = G^T h
Forward keeps only lse (one float per row); backward recomputes z chunk by chunk (4 GEMMs per chunk
instead of 3, nothing of size [rows, vocab] or W x float32 held from forward to backward).
"""

import torch
import torch.nn.functional as F

IGNORE = -100
DEFAULT_CE_CHUNK = 1024


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_fused_addmm = {"ok": None}  # CUDA addmm with a float32 output from half inputs: probed on first use


def _accumulate_head_grad(gw: torch.Tensor, p: torch.Tensor, hc: torch.Tensor, compute_dtype: torch.dtype) -> None:
    """gw += p^T hc with gw float32 (or float64). On CUDA with a half compute dtype, one bf16/fp16 GEMM with a
    float32 output straight into gw (torch.addmm(..., out_dtype=float32)); elsewhere a GEMM in gw's dtype."""
    half = compute_dtype in (torch.bfloat16, torch.float16)
    if gw.device.type == "cuda" and half and _fused_addmm["ok"] is not False:
        try:
            torch.addmm(gw, p.to(compute_dtype).t(), hc.to(compute_dtype), out_dtype=gw.dtype, out=gw)
            _fused_addmm["ok"] = True
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _fused_addmm["ok"] = False
    gw.addmm_(p.t(), hc.to(gw.dtype))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i [y_i != ignore] * CE(h_i W^T, y_i), computed `chunk` rows at a time in `compute_dtype` (the
    GEMMs) with float32 (float64 for float64 inputs) softmax and accumulation. Returns a 0-dim tensor in
    the accumulation dtype. Gradients for h and W; none for the targets."""

    @staticmethod
    def forward(ctx, h, w, targets, chunk: int, ignore_index: int, compute_dtype):
        acc = _acc_dtype(h.dtype)
        cd = compute_dtype or h.dtype
        n = h.shape[0]
        lse = torch.empty(n, dtype=acc, device=h.device)
        loss = torch.zeros((), dtype=acc, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            wc = w.to(cd)
            for s in range(0, n, chunk):
                t = targets[s : s + chunk]
                z = (h[s : s + chunk].to(cd) @ wc.t()).to(acc)  # [c, V]: the only big temporary
                zt = z.gather(1, t.clamp_min(0)[:, None]).squeeze(1)
                m = z.amax(dim=1)
                l = z.sub_(m[:, None]).exp_().sum(dim=1).log_().add_(m)  # logsumexp, in place on z
                del z
                lse[s : s + chunk] = l
                loss += torch.where(t != ignore_index, l - zt, 0).sum()  # no host sync
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk, ctx.ignore_index, ctx.cd = chunk, ignore_index, cd
        return loss

    @staticmethod
    def backward(ctx, g):
        h, w, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        chunk, cd = ctx.chunk, ctx.cd
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=lse.dtype, device=w.device) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            wc = w.to(cd)
            for s in range(0, h.shape[0], chunk):
                hc, t = h[s : s + chunk], targets[s : s + chunk]
                p = (hc.to(cd) @ wc.t()).to(lse.dtype)
                p.sub_(lse[s : s + chunk, None]).exp_()  # softmax, recomputed
                rows = torch.arange(t.shape[0], device=t.device)
                p[rows, t.clamp_min(0)] -= 1.0  # softmax - onehot
                p.mul_(((t != ctx.ignore_index).to(p.dtype) * g.to(p.dtype))[:, None])  # mask, upstream grad
                if need_h:
                    gh[s : s + chunk] = p.to(cd) @ wc
                if need_w:
                    _accumulate_head_grad(gw, p, hc, cd)
                del p
        return gh, (gw.to(w.dtype) if need_w else None), None, None, None, None


def chunked_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = DEFAULT_CE_CHUNK,
    ignore_index: int = IGNORE,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sum of the cross-entropies of rows h [N, d] under the head `weight` [V, d] (no bias), `chunk` rows at a
    time; rows whose target is `ignore_index` add nothing. `compute_dtype`: the GEMMs' dtype (default h's)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return ChunkedLinearCrossEntropy.apply(h, weight, targets, int(chunk), ignore_index, compute_dtype)


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype matmuls run in here: autocast's when it is on (the one-process bf16 path), else None (the
    tensors' own: FSDP's MixedPrecisionPolicy has already cast the parameters)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def sft_loss_sum(model, mb, ce_chunk: int | None = DEFAULT_CE_CHUNK) -> torch.Tensor:
    """Sum of next-token cross entropies over the micro-batch's target positions (float32; float64 for a
    float64 model). Only the target rows reach the head; with `ce_chunk`, in chunks (see the module doc)."""
    keep = mb.targets != IGNORE  # [B, T]
    if not bool(keep.any()):  # dummy batch: keep the graph connected, add nothing
        keep = torch.zeros_like(keep)
        keep[0, 0] = True
    kw = {}
    if mb.cu_seq_lens is not None:  # packed row: segment bounds for varlen attention (ours or flash)
        kw = dict(
            cu_seq_lens_q=mb.cu_seq_lens, cu_seq_lens_k=mb.cu_seq_lens, max_length_q=mb.max_len, max_length_k=mb.max_len
        )
    base = getattr(model, model.base_model_prefix)
    out = base(
        input_ids=mb.input_ids,
        attention_mask=mb.attention_mask,
        position_ids=mb.position_ids,
        use_cache=False,
        **kw,
    )
    h = out.last_hidden_state[keep]  # [n_keep, hidden]
    targets = mb.targets[keep]
    head = model.get_output_embeddings()
    if ce_chunk:
        if getattr(head, "bias", None) is not None:
            raise ValueError("chunked cross-entropy needs an LM head without bias; set ce_chunk=None")
        return chunked_cross_entropy(h, head.weight, targets, ce_chunk, IGNORE, _compute_dtype(h.device))
    logits = head(h)
    logits = logits.to(_acc_dtype(logits.dtype))  # [n_keep, vocab] float32 (float64 stays)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
