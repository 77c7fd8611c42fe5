"""`bstar-engine generate`: sample n candidates per prompt from a JSONL or text file into JSONL."""

import click

from bstar.errors import DataError
from bstar.utils.jsonl import emit, read_jsonl


def _load_prompts(path: str) -> list[str | list[int]]:
    """JSONL lines with `prompt` (text) or `prompt_token_ids`; a .txt file gives one prompt per line."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    prompts = []
    for i, rec in enumerate(read_jsonl(path)):
        if "prompt_token_ids" in rec:
            prompts.append(rec["prompt_token_ids"])
        elif "prompt" in rec:
            prompts.append(rec["prompt"])
        else:
            raise DataError(f"{path}: record {i + 1} has neither 'prompt' nor 'prompt_token_ids'")
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

    prompts = _load_prompts(prompts_file)
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
        }
        for o in outputs
    ]
    emit(records, out)
