"""bstar.cli.options: `run`'s and `sft`'s options are derived from RunConfig and SFTConfig. Every field has
exactly one option (and every option is a field or one of the command's own), with the field's default and
help; a command line parses to the config a direct construction gives; bad values are one line."""

import dataclasses
import importlib
import subprocess
import sys
import types
import typing
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from bstar.cli import main
from bstar.cli.options import config_options, option_name, show_value
from bstar.loop.config import RunConfig, embedded_run_config
from bstar.loop.search import REFERENCE_TEMPERATURES, REFERENCE_THRESHOLDS, format_grid, grid, parse_grid
from bstar.train.config import SFTConfig
from bstar.utils.settings import field_default, setting

run_mod = importlib.import_module("bstar.cli.run")  # (bstar.cli.run is also the name of the command)
sft_mod = importlib.import_module("bstar.cli.sft")
# each command's options that are not config fields
OWN = {run_mod.run: {"out", "resume", "compare", "seeds", "jobs", "quiet", "reward_sweep", "sweep_noises"}}
OWN[sft_mod.sft] = {"model", "data", "out"}
OWN[sft_mod.sft] |= {"resume", "save_every"}
CASES = [(run_mod.run, RunConfig, run_mod.COVERED), (sft_mod.sft, SFTConfig, sft_mod.COVERED)]
IDS = ["run", "sft"]
MODE_LIST = "bstar, online-rft, online-rft-answer, rest-em, star"

# text fields whose values are checked: a valid value other than the default
TEXT = {
    "model": "/models/policy",
    "prm": "/models/prm",
    "train_data": "train.jsonl",
    "eval_data": "eval.jsonl",
    "prompt_template": "Q: {question}\nA:",
    "prm_aggregate": "last",
    "device": "cpu",
    "attn_implementation": "sdpa",
    "prompt_field": "question",
    "completion_field": "answer",
}


def _kind(cls, name):
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _other_value(cls, f):
    """A valid value of field `f` other than its default, whatever its type (so a new field is covered)."""
    kind, default, meta = _kind(cls, f.name), field_default(f), f.metadata
    if kind is bool:
        return not default if default is not None else True
    if "choices" in meta:
        return next(c for c in reversed(meta["choices"]) if c != default)
    if f.name in TEXT:
        return TEXT[f.name]
    if kind is int:
        return default + 1 if default is not None else 3
    if kind is float:
        return default / 2 if default else 0.5
    if typing.get_origin(kind) is list:
        return ["\n\n", "Question:"] if typing.get_args(kind)[0] is str else [0.3, 0.9]
    if typing.get_origin(kind) is tuple:
        return tuple(x / 2 for x in default)
    return "x"


def _argv(cls, values: dict) -> list[str]:
    """The command line that sets `values` (field -> value)."""
    argv = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, name = values[f.name], option_name(f.name)
        if isinstance(v, bool):
            argv.append(name if v else f"--no-{name[2:]}")
        elif "parse" in f.metadata:
            argv += [name, f.metadata["show"](v)]
        elif isinstance(v, list):
            for x in v:
                argv += [name, str(x)]
        elif isinstance(v, tuple):
            argv += [name, *map(str, v)]
        else:
            argv += [name, str(v)]
    return argv


def _params(cmd) -> dict[str, click.Parameter]:
    return {p.name: p for p in cmd.params}


@pytest.mark.parametrize("cmd, cls, covered", CASES, ids=IDS)
def test_every_field_has_exactly_one_option_and_every_option_a_field(cmd, cls, covered):
    params = _params(cmd)
    assert len(params) == len(cmd.params)  # no name twice
    fields = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):  # the help is kept beside the field: bstar.utils.settings.setting
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help: declare it with setting(default, help)"
    for name in fields - set(covered):
        assert params[name].opts == [option_name(name)], name
        assert params[name].help and "[default: " in params[name].help, name
    for name, option in covered.items():  # set from an option of the command's own
        assert name in fields and name not in params and option in OWN[cmd], name
    assert set(params) - fields == OWN[cmd]


@pytest.mark.parametrize("cmd, cls, covered", CASES, ids=IDS)
def test_option_defaults_are_the_fields_defaults(cmd, cls, covered):
    params = _params(cmd)
    for f in dataclasses.fields(cls):
        if f.name not in covered:
            want = field_default(f)
            assert params[f.name].default == (tuple(want) if params[f.name].multiple else want), f.name
    if cls is RunConfig:  # the reference's grids
        assert params["temperatures"].default == list(REFERENCE_TEMPERATURES)
        assert params["thresholds"].default == list(REFERENCE_THRESHOLDS)


def test_help_lists_every_option_with_its_default():
    for name, cmd in (("run", run_mod.run), ("sft", sft_mod.sft)):
        r = CliRunner().invoke(main, [name, "--help"], terminal_width=400)
        assert r.exit_code == 0, r.output
        lines = {ln.split()[0]: ln for ln in r.output.splitlines() if ln.startswith("  --")}
        for p in cmd.params:
            assert p.opts[0] in lines, p.opts[0]
    r = CliRunner().invoke(main, ["run", "--help"], terminal_width=400)
    assert "--num-samples INTEGER " in r.output and "[default: 64; built-in task: 8]" in r.output
    assert "[default: 0.5:1.2:0.05; built-in task: 0.4:1.6:0.3]" in r.output
    assert "--mode [bstar|online-rft|online-rft-answer|rest-em|star]" in r.output
    assert "--queries-per-iteration INTEGER" in r.output and "built-in task: 256]" in r.output


def _run_values():
    return {f.name: _other_value(RunConfig, f) for f in dataclasses.fields(RunConfig) if f.name != "embedded_preset"}


def test_run_command_line_parses_to_the_directly_built_config():
    values = _run_values()
    values.pop("progress")  # covered by --quiet
    values.pop("verifier_noise")  # the built-in task's only (refused with --model)
    with run_mod.run.make_context("run", [*_argv(RunConfig, values), "--quiet"]) as ctx:
        got = run_mod.run_config(run_mod.given_options(ctx.params, ctx), ctx.params["quiet"])
    assert got == RunConfig(**values, progress=False)
    assert got.stop == ["\n\n", "Question:"] and got.temperatures == [0.3, 0.9] and got.include_gold is False
    # without --model: the options given over the built-in task's settings, the rest its own
    given = {"embedded_preset": "tiny", "iterations": 2, "temperatures": [0.7, 1.0], "rationalize": True}
    with run_mod.run.make_context("run", _argv(RunConfig, given)) as ctx:
        got = run_mod.run_config(run_mod.given_options(ctx.params, ctx))
    assert got == embedded_run_config(**given) and got.num_samples == embedded_run_config().num_samples
    # nothing given: every field as the built-in task's or, with --model, RunConfig's own
    with run_mod.run.make_context("run", []) as ctx:
        assert run_mod.run_config(run_mod.given_options(ctx.params, ctx)) == embedded_run_config()
    with run_mod.run.make_context("run", ["--model", "m"]) as ctx:
        assert run_mod.run_config(run_mod.given_options(ctx.params, ctx)) == RunConfig(model="m")


def test_sft_command_line_parses_to_the_directly_built_config(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    own = ["--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")]
    values = {f.name: _other_value(SFTConfig, f) for f in dataclasses.fields(SFTConfig) if f.name != "metrics_path"}
    with sft_mod.sft.make_context("sft", [*own, *_argv(SFTConfig, values)]) as ctx:
        got = sft_mod.sft_config(ctx.params, tmp_path / "o")
    assert got == SFTConfig(**values, metrics_path=str(tmp_path / "o" / "metrics.jsonl"))
    assert got.betas == (0.45, 0.475) and got.pack is False and got.max_grad_norm == 0.5
    with sft_mod.sft.make_context("sft", own) as ctx:
        assert sft_mod.sft_config(ctx.params, tmp_path / "o") == SFTConfig(metrics_path=got.metrics_path)


BAD = [
    (["run", "--iterations", "two"], "--iterations must be an integer, got 'two'"),
    (["run", "--lr", "fast"], "--lr must be a number, got 'fast'"),
    (["run", "--mode", "greedy"], f"--mode must be one of {MODE_LIST}, got 'greedy'"),
    (["run", "--dtype", "int8"], "--dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
    (["run", "--temperatures", "hot"], "bad grid 'hot'"),
    (["sft", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["sft", "--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1], got 1.5"),
    (["sft", "--betas", "0.9", "x"], "--betas must be a number, got 'x'"),
]


@pytest.mark.parametrize("args, why", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_values_are_one_line(tmp_path, args, why):
    if args[0] == "sft":
        (tmp_path / "d.jsonl").write_text("")
        args = [*args, "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl")]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.output.startswith(f"error: {why}") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "o").exists()


def test_a_new_field_with_its_help_is_all_an_option_takes():
    @dataclass
    class Config:
        noise: float = setting(0.1, "Verifier noise level.", low=0, high=1)
        fresh_queries: bool = setting(False, "Fresh queries every iteration.")
        rewards: list[float] = setting(help="Reward sweep.", factory=lambda: [0.5, 1.0], parse=parse_grid)
        label: str | None = setting(None, "A name.", unset="the date")

    @click.command()
    @config_options(Config)
    def cmd(**kw):
        click.echo(repr(Config(**kw)))

    r = CliRunner().invoke(cmd, ["--noise", "0.25", "--fresh-queries", "--rewards", "0:1:0.5"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(Config(noise=0.25, fresh_queries=True, rewards=[0.0, 0.5, 1.0]))
    text = CliRunner().invoke(cmd, ["--help"], terminal_width=200).output
    assert "--noise FLOAT" in text and "Verifier noise level.  [default: 0.1]" in text
    assert "--fresh-queries / --no-fresh-queries" in text and "[default: the date]" in text
    with pytest.raises(TypeError, match="no command-line form"):

        @dataclass
        class Odd:
            table: dict = setting(help="?", factory=dict)

        config_options(Odd)


def test_show_value_round_trips_the_grids():
    f = {f.name: f for f in dataclasses.fields(RunConfig)}
    for values in (REFERENCE_TEMPERATURES, REFERENCE_THRESHOLDS, grid(0.4, 1.6, 0.3), [0.7, 1.0], [0.5], [0, 1, 3]):
        text = show_value(f["temperatures"], list(values))
        assert parse_grid(text) == [float(x) for x in values] and text == format_grid(values)
    assert format_grid(REFERENCE_TEMPERATURES) == "0.5:1.2:0.05" and format_grid([0, 1, 3]) == "0,1,3"
    assert show_value(f["max_train_queries"], None) == "all" and show_value(f["include_gold"], True) == "on"


def test_the_command_line_loads_no_torch_for_its_options():
    """sft's options come from SFTConfig: bstar.train.config (and the CLI) import without torch."""
    code = (
        "import sys, bstar.cli, bstar.train.config; print(sorted(m for m in sys.modules if m.startswith('torch'))[:3])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_run_config_checks_each_field_against_its_annotation():
    """A hand-edited config.json or a direct construction: each value of the field's annotated type."""
    from bstar.errors import BStarError

    for bad, why in [
        (dict(iterations="5"), "iterations must be int, got '5'"),
        (dict(lr="1e-5"), "lr must be float or int"),
        (dict(include_gold=1), "include_gold must be bool"),
        (dict(num_samples=True), "num_samples must be int"),
        (dict(temperatures=[0.5, "1"]), "temperatures must be list"),
        (dict(temperatures=[True]), "temperatures must be list"),
        (dict(stop=["\n", 3]), "stop must be list"),
        (dict(max_per_query="3"), "max_per_query must be int"),
        (dict(model=5), "model must be str"),
    ]:
        with pytest.raises(BStarError, match=why):
            RunConfig(**bad)
    ok = RunConfig(lr=1, max_per_query=None, restart_from_base=None, stop=["\n"], temperatures=[1, 0.5])
    assert ok.temperatures == [0.5, 1.0] and ok.restart_from_base is False


def test_generate_sampling_options_are_sampling_params_fields():
    """generate's sampling options: SamplingParams' fields with their help; its defaults but generate's own."""
    from bstar.engine import SamplingParams

    gen_mod = importlib.import_module("bstar.cli.generate")
    params = _params(gen_mod.generate)
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    assert set(params) - set(fields) == {"model", "prompts_file", "out", "dtype", "device", "num_kv_blocks"}
    assert set(params) & set(fields) == set(gen_mod.SAMPLING)
    for name in gen_mod.SAMPLING:
        want = gen_mod.DEFAULTS.get(name, field_default(fields[name]))
        assert params[name].default == (tuple(want or ()) if params[name].multiple else want), name
        assert fields[name].metadata["help"] in params[name].help, name
    values = dict(n=3, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_tokens=9, min_tokens=2)
    values.update(stop=["\n\n", "Q:"], ignore_eos=True, seed=7, logprobs=2)
    argv = ["--model", "m", "--prompts", "p.jsonl", *_argv(SamplingParams, values)]
    with gen_mod.generate.make_context("generate", argv) as ctx:
        assert SamplingParams(**gen_mod.config_values(SamplingParams, ctx.params)) == SamplingParams(**values)
    with gen_mod.generate.make_context("generate", ["--model", "m", "--prompts", "p.jsonl"]) as ctx:
        got = SamplingParams(**gen_mod.config_values(SamplingParams, ctx.params))
    assert got == SamplingParams(max_tokens=256, seed=0) and got.stop is None


def test_configs_check_their_fields_choices_and_bounds_as_their_options_do():
    """The same choices and bounds refuse a direct construction (the loop, a hand-edited config.json)."""
    from bstar.errors import BStarError

    for cls, bad, why in [
        (RunConfig, dict(mode="greedy"), f"mode must be one of {MODE_LIST}, got 'greedy'"),
        (RunConfig, dict(search_subset=0), "search_subset must be >= 1, got 0"),
        (RunConfig, dict(max_train_queries=0), "max_train_queries must be >= 1, got 0"),
        (RunConfig, dict(dtype="int8"), "dtype must be one of auto, float32, bfloat16, float16"),
        (SFTConfig, dict(epochs=0), "epochs must be >= 1, got 0"),
        (SFTConfig, dict(warmup_ratio=float("nan")), r"warmup_ratio must be in \[0, 1\], got nan"),
        (SFTConfig, dict(schedule="linear"), "schedule must be one of cosine, constant"),
        (SFTConfig, dict(on_bad_data="ignore"), "on_bad_data must be one of skip, refuse"),
        (SFTConfig, dict(ce_chunk=-1), "ce_chunk must be >= 0"),
    ]:
        with pytest.raises(BStarError, match=why):
            cls(**bad)
    assert RunConfig(max_train_queries=None).max_train_queries is None and SFTConfig(ce_chunk=0).ce_chunk == 0
