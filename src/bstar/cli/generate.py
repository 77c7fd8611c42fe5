"""`bstar-engine generate`: sample n candidates per prompt from a JSONL or text file into JSONL."""

import click

from bstar.cli.checks import check_model_dir, check_out_file
from bstar.cli.options import config_options, config_values
from bstar.engine.entrypoints.sampling_params import SamplingParams  # light: no torch
from bstar.errors import BStarError, DataError
from bstar.utils.jsonl import emit, iter_jsonl

# SamplingParams' fields that are generate's options, and generate's own defaults: a completion's worth of
# tokens, and the same outputs for the same command
SAMPLING = ("n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "stop", "ignore_eos")
SAMPLING += ("seed", "logprobs")
DEFAULTS = {"max_tokens": 256, "seed": 0}


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
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--num-kv-blocks", default=None, type=int, help="KV budget in blocks.  [default: sized from memory]")
@config_options(SamplingParams, only=SAMPLING, defaults=DEFAULTS)
def generate(model, prompts_file, out, dtype, device, num_kv_blocks, **sampling):
    """Generate candidates for every prompt and write one JSONL record per prompt."""
    from bstar.engine import LLM  # torch: loaded when the command runs, not for --help
    from bstar.engine.config import resolve_device

    # Every option, the model's config and the prompts, before anything loads or is written.
    if num_kv_blocks is not None and num_kv_blocks < 1:
        raise BStarError(f"--num-kv-blocks must be >= 1 (or left out: sized from memory), got {num_kv_blocks}")
    resolve_device(device)
    check_out_file(out)
    prompts = _load_prompts(prompts_file)
    check_model_dir(model)
    params = SamplingParams(**config_values(SamplingParams, sampling))
    llm = LLM(model, dtype=dtype, device=device, seed=params.seed, num_kv_blocks=num_kv_blocks)
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
