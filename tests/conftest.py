"""Shared fixtures: tiny randomly initialised models built from a config (no downloads),
and a throwaway PostgreSQL server."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(
    layers: int = 4, hidden: int = 64, neurons: int = 128, vocab: int = 256, seed: int = 0
):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=neurons,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(
    layers: int = 4, hidden: int = 64, neurons: int = 128, vocab: int = 256, seed: int = 0
):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        ffn_dim=neurons,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=hidden,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
    )
    model = OPTForCausalLM(cfg).eval()
    # Random init gives fc1 biases of 0: shift them so ReLU zeros some neurons per token
    # and the realized density can fall below the keep ratio, as on real OPT models.
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.fc1.bias.normal_(-0.05, 0.05)
    return model


def tiny_tokenizer(vocab: int = 256):
    """A real fast tokenizer with a byte-level vocabulary built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_map = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i in range(vocab - 3):
        vocab_map[chr(0x20 + i)] = i + 3
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
    )
    return fast


def run_cli(args: list[str], cwd) -> object:
    """Run ``autosparse ARGS`` in-process from folder ``cwd`` (where studies/ lands);
    returns click's Result."""
    from click.testing import CliRunner

    from autosparse.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner(env={"COLUMNS": "250"}).invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and tokenizer saved as a model folder (``--model DIR``)."""
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llama(layers=4, hidden=64, neurons=128, vocab=300).save_pretrained(path)
    tiny_tokenizer(300).save_pretrained(path)
    return str(path)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def opt():
    return tiny_opt()


@pytest.fixture(params=["llama", "opt"])
def any_model(request):
    return tiny_llama() if request.param == "llama" else tiny_opt()


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


# ------------------------------------------------------------------ PostgreSQL

#: set to 1 (CI does) to fail, not skip, when no PostgreSQL server can be started
REQUIRE_POSTGRES = "AUTOSPARSE_REQUIRE_POSTGRES"


def _postgres_unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_POSTGRES) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_POSTGRES}=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def postgres_binaries() -> tuple[str, str] | None:
    """(initdb, pg_ctl) from PATH or, since Debian keeps them off PATH, from the newest
    /usr/lib/postgresql/<version>/bin."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl

    def version(bindir: str) -> tuple[int, ...]:
        v = bindir.split("/")[-2]
        return tuple(int(p) for p in v.split(".") if p.isdigit())

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        initdb, pg_ctl = os.path.join(bindir, "initdb"), os.path.join(bindir, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return initdb, pg_ctl
    return None


def _run_as_server_user(cmd: list[str], owner: str | None, cwd: str) -> None:
    if owner:
        cmd = ["runuser", "-u", owner, "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server for the whole test session, on a Unix socket in a temporary
    directory (no TCP port, so it cannot clash with another server). The URL names its
    ``postgres`` database; tests that need a database of their own use ``postgres_database``.
    Skips when the server binaries or psycopg2 are missing, unless
    AUTOSPARSE_REQUIRE_POSTGRES=1, which turns the skip into a failure."""
    found = postgres_binaries()
    if found is None:
        _postgres_unavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed "
            "(Debian: apt-get install postgresql)"
        )
    initdb, pg_ctl = found
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _postgres_unavailable("psycopg2 is not installed (pip install psycopg2-binary)")
    owner = None
    # A short path: the socket's path must fit in ~100 bytes.
    root = tempfile.mkdtemp(prefix="as-pg-")
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            _postgres_unavailable("running as root and there is no postgres user to run the server")
        owner = "postgres"
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data = os.path.join(root, "data")
    # Names the socket file only: the server listens on no TCP address.
    port = 40000 + os.getpid() % 20000
    try:
        _run_as_server_user(
            [initdb, "-N", "-D", data, "-A", "trust", "-U", "postgres"], owner, root
        )
        opts = f"-k {root} -p {port} -c listen_addresses='' -c fsync=off -c max_connections=200"
        log = os.path.join(root, "log")
        _run_as_server_user([pg_ctl, "-D", data, "-o", opts, "-l", log, "-w", "start"], owner, root)
        try:
            yield f"postgresql://postgres@/postgres?host={root}&port={port}"
        finally:
            _run_as_server_user([pg_ctl, "-D", data, "-m", "immediate", "stop"], owner, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_url):
    """The URL of a new, empty database in the session's PostgreSQL server, dropped after
    the test."""
    import psycopg2
    from sqlalchemy.engine import make_url

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_url(postgres_url)

    def execute(sql: str) -> None:
        conn = psycopg2.connect(
            dbname=admin.database,
            user=admin.username,
            host=admin.query["host"],
            port=admin.query["port"],
        )
        conn.autocommit = True  # CREATE/DROP DATABASE refuse to run in a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    execute(f"CREATE DATABASE {name}")
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
