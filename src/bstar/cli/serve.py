"""`bstar-engine serve`: the OpenAI-compatible server (bstar/serve) on one model, as `vllm serve`."""

import click


@click.command("serve")
@click.option("--model", required=True, help="Local Hugging Face model directory.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True)
@click.option("--served-model-name", default=None, help="The model's name in requests (default: --model).")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--max-model-len", default=None, type=int)
@click.option("--max-num-seqs", default=256, show_default=True)
@click.option("--gpu-memory-utilization", default=0.9, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--enforce-eager", is_flag=True)
@click.option("--max-logprobs", default=20, show_default=True)
def serve(model, host, port, served_model_name, dtype, device, max_model_len, max_num_seqs, **engine_kw):
    """Serve MODEL over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    import uvicorn

    from bstar.engine import AsyncLLM
    from bstar.serve.app import build_app

    engine = AsyncLLM(
        model, dtype=dtype, device=device, max_model_len=max_model_len, max_num_seqs=max_num_seqs, **engine_kw
    )
    app = build_app(engine, served_model_name or model)
    click.echo(f"serving {served_model_name or model} on http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
