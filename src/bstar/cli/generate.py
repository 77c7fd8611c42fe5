"""`bstar-engine generate`: sample n candidates per prompt from a JSONL or text file into JSONL."""

import click

from bstar.cli.checks import check_model_dir, check_out_file
from bstar.errors import BStarError, DataError
from bstar.utils.jsonl import emit, iter_jsonl


def _load_prompts(path: str) -> list[str | list[int]]:
    """JSONL lines with `prompt` (text) or `prompt_token_ids` (a list of ints); a .txt file gives one prompt
    per line. A wrong type is refused with its line number ({"prompt": 42} is not a prompt)."""
    if path.endswith(".txt"):
        try:
            with open(path, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    prompts = []
    for lineno, rec in iter_jsonl(path):
        if "prompt_token_ids" in rec:
            ids = rec["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise DataError(f"{path}:{lineno}: 'prompt_token_ids' must be a list of integers")
            prompts.append(ids)
        elif "prompt" in rec:
            if not isinstance(rec["prompt"], str):
                raise DataError(f"{path}:{lineno}: 'prompt' must be a string (token ids go in 'prompt_token_ids')")
            prompts.append(rec["prompt"])
        else:
            raise DataError(f"{path}:{lineno}: record has neither 'prompt' nor 'prompt_token_ids'")
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


@click.command("generate")
@click.option("--model", required=True, help="Local Hugging Face model directory.")
@click.option("--prompts", "prompts_file", required=True, help="JSONL with 'prompt' (or 'prompt_token_ids'), or .txt.")
@click.option("--out", default="-", show_default=True, help="Output JSONL ('-' for stdout).")
@click.option("--n", default=1, show_default=True, help="Candidates per prompt.")
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=-1, show_default=True)
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--min-tokens", default=0, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--logprobs", default=None, type=int, help="Return logprobs (and top-k when > 0).")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--num-kv-blocks", default=None, type=int)
def generate(
    model,
    prompts_file,
    out,
    n,
    temperature,
    top_p,
    top_k,
    min_p,
    max_tokens,
    min_tokens,
    stop,
    ignore_eos,
    seed,
    logprobs,
    dtype,
    device,
    num_kv_blocks,
):
    """Generate candidates for every prompt and write one JSONL record per prompt."""
    from bstar.engine import LLM, SamplingParams  # torch: loaded when the command runs, not for --help
    from bstar.engine.config import resolve_device

    # Every option, the model's config and the prompts, before anything loads or is written.
    if num_kv_blocks is not None and num_kv_blocks < 1:
        raise BStarError(f"--num-kv-blocks must be >= 1 (or left out: sized from memory), got {num_kv_blocks}")
    resolve_device(device)
    check_out_file(out)
    prompts = _load_prompts(prompts_file)
    check_model_dir(model)
    params = SamplingParams(
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=list(stop) or None,
        ignore_eos=ignore_eos,
        seed=seed,
        logprobs=logprobs,
    )
    llm = LLM(model, dtype=dtype, device=device, seed=seed, num_kv_blocks=num_kv_blocks)
    outputs = llm.generate(prompts, params)
    failed = [o for o in outputs if o.error is not None]
    if len(failed) == len(outputs):  # nothing worth writing (e.g. NaN weights)
        raise BStarError(f"every request failed; the first: {failed[0].error}")
    if failed:
        click.echo(f"warning: {len(failed)} of {len(outputs)} requests failed (their records hold 'error')", err=True)
    records = [
        {
            "prompt": o.prompt,
            "prompt_token_ids": o.prompt_token_ids,
            "outputs": [
                {
                    "index": c.index,
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "cumulative_logprob": c.cumulative_logprob,
                    "finish_reason": c.finish_reason,
                    **(
                        {"logprobs": [{str(k): v.logprob for k, v in d.items()} for d in c.logprobs]}
                        if c.logprobs is not None
                        else {}
                    ),
                }
                for c in o.outputs
            ],
            **({"error": o.error} if o.error is not None else {}),
        }
        for o in outputs
    ]
    emit(records, out)
