"""lm-evaluation-harness's `vllm` backend (with `vllm` = bstar.vllm) and its `local-completions` backend
(against `bstar-engine serve`'s app on loopback) each against its `hf` backend on one tiny checkpoint:
loglikelihood, loglikelihood_rolling and greedy generate_until. argv: a model directory. Prints one RESULT
line of JSON. Generated strings are compared with the special tokens' text removed: lm-eval asks the vllm
backend for skip_special_tokens=False (so vLLM's text has them too), its hf backend skips them."""

import json
import random
import sys
import time

import bstar.vllm

bstar.vllm.install()
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.models.vllm_causallms import VLLM  # noqa: E402

path = sys.argv[1]
rng = random.Random(0)
WORDS = "the cat sat on a mat and then ran to see what the dog was doing in the old barn".split()


def text(n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


ll = [Instance("loglikelihood", {}, (text(rng.randint(2, 12)), " " + text(rng.randint(1, 4))), i) for i in range(32)]
rolling = [Instance("loglikelihood_rolling", {}, (text(rng.randint(5, 40)),), i) for i in range(8)]
gen = [
    Instance(
        "generate_until",
        {},
        (text(rng.randint(3, 10)), {"until": ["\n", "dog"], "max_gen_toks": 12, "do_sample": False}),
        i,
    )
    for i in range(8)
]
t0 = time.time()
ours = VLLM(pretrained=path, dtype="float32", max_model_len=512, batch_size=8, seed=0)
hf = HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=8, max_length=512)
a_ll, b_ll = ours.loglikelihood(ll), hf.loglikelihood(ll)
a_r, b_r = ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling)
a_g, b_g = ours.generate_until(gen), hf.generate_until(gen)


def plain(s):
    return s.replace("<s>", "").replace("</s>", "").replace("<pad>", "")


result = {
    "ll_max_diff": max(abs(x[0] - y[0]) for x, y in zip(a_ll, b_ll)),
    "greedy_equal": sum(x[1] == y[1] for x, y in zip(a_ll, b_ll)),
    "n_ll": len(ll),
    "rolling_max_diff": max(abs(x - y) for x, y in zip(a_r, b_r)),
    "gen_equal": sum(plain(x) == plain(y) for x, y in zip(a_g, b_g)),
    "n_gen": len(gen),
    "is_bstar": type(ours.model).__module__.startswith("bstar."),
    "seconds": round(time.time() - t0, 1),
}
print("RESULT", json.dumps(result))
del ours
# local-completions against the server
import socket  # noqa: E402
import threading  # noqa: E402

import uvicorn  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

from bstar.engine import AsyncLLM  # noqa: E402
from bstar.serve.app import build_app  # noqa: E402

with socket.socket() as sk:
    sk.bind(("127.0.0.1", 0))
    port = sk.getsockname()[1]
engine = AsyncLLM(path, dtype="float32", device="cpu", max_model_len=512)
srv = uvicorn.Server(uvicorn.Config(build_app(engine, "tiny"), host="127.0.0.1", port=port, log_level="warning"))
threading.Thread(target=srv.run, daemon=True).start()
while not srv.started:
    time.sleep(0.05)
t0 = time.time()
api = LocalCompletionsAPI(
    base_url=f"http://127.0.0.1:{port}/v1/completions",
    model="tiny",
    tokenizer=path,
    tokenizer_backend="huggingface",
    max_length=512,
    num_concurrent=4,
    add_bos_token=True,  # (as the hf backend, whose tokenizer adds <s>)
)
c_ll, c_r, c_g = api.loglikelihood(ll), api.loglikelihood_rolling(rolling), api.generate_until(gen)
server = {
    "ll_max_diff": max(abs(x[0] - y[0]) for x, y in zip(c_ll, b_ll)),
    "greedy_equal": sum(x[1] == y[1] for x, y in zip(c_ll, b_ll)),
    "rolling_max_diff": max(abs(x - y) for x, y in zip(c_r, b_r)),
    "gen_equal": sum(plain(x) == plain(y) for x, y in zip(c_g, b_g)),
    "seconds": round(time.time() - t0, 1),
}
print("SERVER", json.dumps(server))
srv.should_exit = True
