import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker (and its subprocesses),
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # so N workers on N cores do not oversubscribe them

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU; set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

if os.environ.pop("LLARA_TEST_MATMUL", "") == "shuffled":  # scripts/numerics_matrix.sh: another summation
    import shuffled_matmul                                    # order, in this process (its subprocesses keep
                                                              # the library's: two orders meet in those tests)
    shuffled_matmul.install()

from llara_fast.batch import Example
from llara_fast.templates import Template

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# transformers' norms and RoPE in float64 for the exact-algebra comparisons (one home: the benchmark's reference)
from reference_llara import float64_norms_and_rope as _float64_norms_and_rope  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model fp32, tokenizer, template) of the real SmolLM2-135M with the 16 tokens added."""
    from llara_fast.io.load import load

    model, tok, _ = load("smollm2-135m", attn_backend="sdpa")
    return model.eval(), tok, Template.from_tokenizer(tok)


def toy_template(vocab: int, n_special: int = 8, prefix=(1, 5)) -> Template:
    """A template over a toy vocabulary: ids vocab-16..vocab-1 play <s1>..<s16>."""
    new = list(range(vocab - 16, vocab))
    sum_ids = (7, 8, 9) + tuple(new[:n_special])
    pred_ids = (10, 11) + tuple(new[8:8 + n_special])
    return Template(tuple(prefix), sum_ids, pred_ids, tuple(range(3, 3 + n_special)),
                    tuple(range(2, 2 + n_special)), frozenset([0, 1, 2] + new), n_special)


def random_examples(rng: np.random.Generator, lengths, vocab: int, n_targets=(0, 12)) -> list[Example]:
    out = []
    for T in lengths:
        text = rng.integers(3, vocab - 16, size=T)
        st = np.unique(rng.integers(3, vocab - 16, size=rng.integers(*n_targets)))
        pt = np.unique(rng.integers(3, vocab - 16, size=rng.integers(*n_targets)))
        out.append(Example(text.astype(np.int64), st.astype(np.int64), pt.astype(np.int64)))
    return out


def reference_layout(template: Template, text_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example alone, as the reference lays it out: ids BOS " TEXT SUM PRED, position ids
    with PRED restarting after TEXT, and the additive 4-D mask (1, 1, L, L) of DESIGN §1 —
    written from the description, independently of the packer."""
    P, T = len(template.prefix_ids), len(text_ids)
    S, R = len(template.sum_ids), len(template.pred_ids)
    ids = list(template.prefix_ids) + [int(t) for t in text_ids] + list(template.sum_ids) + list(template.pred_ids)
    L = len(ids)
    pos = list(range(P + T + S)) + list(range(P + T, P + T + R))
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    allowed[P + T + S:, P + T:P + T + S] = False  # PRED never sees SUM
    mask = torch.zeros(L, L).masked_fill(~allowed, float("-inf"))
    return torch.tensor([ids]), torch.tensor([pos]), mask[None, None]


def hf_reference_model(model):
    """transformers' LlamaModel (eager attention; float64: see below) holding exactly our model's weights."""
    from transformers import LlamaConfig, LlamaModel

    from llara_fast.io.hf import ours_to_hf

    cfg = LlamaConfig(**{k: v for k, v in model.args.to_hf_config().items() if k != "architectures"})
    dtype = model.tok_embeddings.weight.dtype
    # eager attention takes its softmax in fp32 whatever the dtype; float64 runs use sdpa (float64
    # on the CPU), with the same explicit 4-D mask
    cfg._attn_implementation = "sdpa" if dtype == torch.float64 else "eager"
    ref = LlamaModel(cfg).to(dtype)
    sd = {k.removeprefix("model."): v for k, v in ours_to_hf(model.state_dict()).items() if k != "lm_head.weight"}
    ref.load_state_dict(sd, strict=True)
    if ref.embed_tokens.weight.dtype == torch.float64:
        _float64_norms_and_rope(ref)
    return ref.eval()


CUDA = torch.cuda.is_available()


REAL_MODEL_FIXTURES = {"smollm2"}  # the real SmolLM2-135M: those tests are e2e wherever they live


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/ is marked e2e, so is every test on the real model (a fixture of
    REAL_MODEL_FIXTURES, directly or through another fixture) and any test marked by hand: the
    unit tier (`-m "not e2e"`) is logic on small models, in-process."""
    e2e = Path(__file__).resolve().parent / "e2e"
    for item in items:
        if e2e in Path(str(item.fspath)).resolve().parents or REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames",
                                                                                                   ())):
            item.add_marker(pytest.mark.e2e)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1 "
                                                               "(set by this conftest only where CUDA is absent)")


def kernel_cases(cpu_dtypes=("float32", "float16")):
    """(device, dtype, impl) cases for kernel tests: the Triton kernels (interpreted on CPU) and
    the chunked PyTorch path on CPU in fp32/fp16; bf16 on a GPU only (broken in the interpreter).
    On a GPU machine the kernels are compiled, so their CPU cases are skipped there."""
    cases = [pytest.param("cpu", getattr(torch, d), impl, id=f"cpu-{d}-{impl}",
                          marks=[needs_interpreter] if impl == "triton" else [])
             for d in cpu_dtypes for impl in ("triton", "torch")]
    cases.append(pytest.param("cuda", torch.bfloat16, "triton", id="cuda-bfloat16-triton",
                              marks=pytest.mark.skipif(not CUDA, reason="bf16 kernels are tested on a GPU only")))
    return cases


def poison_empty(shape, device, dtype):
    """An allocator that fills outputs with garbage, so an element a kernel forgot to write shows."""
    t = torch.empty(shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hooked(module: str, *hook_args: str) -> list[str]:
    """A run_entry target that runs `python -m module` under tests/hooked_run.py's Trainer hooks."""
    return [str(Path(__file__).resolve().parent / "hooked_run.py"), *hook_args, "--", module]


def step_hashes(directory) -> dict[int, int]:
    """The global batch fingerprint of each step written by hooked_run.py --hash-dir (summed over
    ranks; the last record of a step wins, as a resumed run re-runs it)."""
    out: dict[int, dict[str, int]] = {}
    for f in sorted(Path(directory).glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {})[f.name] = rec["hash"]
    return {step: sum(v.values()) for step, v in sorted(out.items())}


# Runs compared bit for bit (a resumed run against an unstopped one: the same kernels on the same
# shapes in the same order) run one thread each, so no reduction is split another way.
SAME_ORDER = {"OMP_NUM_THREADS": "1"}


def run_entry(target: list[str], args, nproc: int = 1, env=None, check: bool = True, timeout: int = 300):
    """Run `python -m X ARGS` (target ["-m", X]) or a script (target [path]) as users do: in a
    subprocess, under torch.distributed.run when nproc > 1, offline. Raises with the output's
    tail when it fails and check is set."""
    import subprocess
    import sys
    from pathlib import Path

    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), *target, *args]
    else:
        cmd = [sys.executable, *target, *args]
    p = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def run_in_process(main, args, hooks=(), cwd=None) -> int:
    """A job's main(argv) here, as a 1-process group (what `python -m X` sets up for itself): a fresh
    rendezvous port, cwd the project root like run_entry's (or ``cwd``), Trainer.hooks set, the run directory's lock
    released after it (a process holds it for life), and the environment and global RNG restored."""
    from llara_fast.train.trainer import Trainer

    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               HF_HUB_OFFLINE="1")
    saved_env = {k: os.environ.get(k) for k in env}
    saved_cwd, claim, made = os.getcwd(), Trainer.claim, []

    def claiming(self):
        made.append(self)
        claim(self)
    os.environ.update(env)
    os.chdir(cwd or Path(__file__).resolve().parents[1])
    Trainer.claim, Trainer.hooks = claiming, list(hooks)
    try:
        with torch.random.fork_rng(devices=[]):
            return main(list(args))
    finally:
        Trainer.claim, Trainer.hooks = claim, []
        for t in made:
            lock = getattr(t, "_lock", None)
            if lock is not None:
                lock.release()
        os.chdir(saved_cwd)
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def run_main(module: str, args, check: bool = True, cwd=None):
    """`python -m MODULE ARGS` in this process (run_in_process), for runs whose process is not what a
    test checks (no kill, signal, thread count or torchrun): its exit code, stdout and stderr as a
    subprocess.CompletedProcess; an exception escaping main() is exit 1 with its traceback, as in a
    subprocess. It saves the 8-10 s of CPU that a subprocess spends importing torch, transformers
    and TorchDynamo (FSDP2's DTensor imports it) before its first step."""
    import contextlib
    import importlib
    import io
    import subprocess
    import traceback

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run_in_process(importlib.import_module(module).main, args, cwd=cwd)
            code = 0 if code is None else code  # some mains return None when done, as sys.exit(None)
        except SystemExit as e:  # argparse: --help, a bad flag
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - what the interpreter would print, then exit 1
            traceback.print_exc()
            code = 1
    p = subprocess.CompletedProcess(["-m", module, *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and p.returncode != 0:
        raise AssertionError(f"{p.args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def write_wiki_beir(root: Path, n_docs: int, n_queries: int, split: str = "test", extra_rels=()) -> Path:
    """A BEIR directory of Wikipedia lead paragraphs: corpus d0.. (no titles), query q_i = title i,
    relevant: paragraph i, plus the (query, doc) index pairs of ``extra_rels``."""
    from itertools import islice

    from llara_fast.data.sources import iter_wiki_sample

    (root / "qrels").mkdir(parents=True)
    paras = list(islice(iter_wiki_sample(), n_docs))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, (_, t) in enumerate(paras)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": title}) + "\n"
                                                for i, (title, _) in enumerate(paras[:n_queries])))
    rels = [(i, i) for i in range(n_queries)] + list(extra_rels)
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                                 "".join(f"q{q}\td{d}\t1\n" for q, d in rels))
    return root


HUB_ID = "llara-test/tiny-llama"  # the Hub id of the tiny_hub fixture's model


def hub_snapshot_dir(hf_home: Path, repo_id: str, files: Path, sha: str, link: bool = False) -> Path:
    """The HF cache layout of one model snapshot, as huggingface_hub leaves it after a download:
    HF_HOME/hub/models--ORG--NAME/snapshots/SHA/<files> and refs/main holding SHA (``link``:
    symlinks to ``files`` instead of copies, for big weights)."""
    import shutil

    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in files.iterdir():
        (snap / f.name).symlink_to(f.resolve()) if link else shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snap


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory):
    """(HF_HOME, snapshot dir, commit sha) of a Hub cache holding HUB_ID: the debug preset's shape,
    random weights, and SmolLM2's tokenizer as a Hub repo ships it (without <s1>..<s16>)."""
    import dataclasses
    import hashlib

    from llara_fast.config import PRESETS
    from llara_fast.io.hf import load_tokenizer, resolve_source, save_hf_dir
    from llara_fast.model import Transformer

    root = tmp_path_factory.mktemp("hub")
    model = Transformer(dataclasses.replace(PRESETS["debug"]))
    model.init_weights(seed=0)
    save_hf_dir(model, root / "files", load_tokenizer(resolve_source("smollm2-135m")))
    sha = hashlib.sha1(b"tiny-llama").hexdigest()
    return root / "hf_home", hub_snapshot_dir(root / "hf_home", HUB_ID, root / "files", sha), sha


@pytest.fixture
def offline_hub(tiny_hub, monkeypatch):
    """tiny_hub as this process's HF cache (HF_HOME), offline."""
    monkeypatch.setenv("HF_HOME", str(tiny_hub[0]))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny_hub


@pytest.fixture
def in_process_group(monkeypatch):
    """The environment a one-process training run (pretrain/finetune main(argv) in this process)
    sets up for its process group, restored afterwards."""
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
