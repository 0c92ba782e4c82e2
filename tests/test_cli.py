"""The ``sqc`` command, run for real in a subprocess on a tiny random LLaMA folder."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sqc

TEXT = "\n".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog while sqc packs {i % 7} codes per word."
    for i in range(400)
)


def run(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "sqc", *args], capture_output=True, text=True, timeout=600)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text(TEXT)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    model_dir = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return root, model_dir, text


@pytest.fixture(scope="module")
def compiled_dir(workspace):
    root, model_dir, text = workspace
    out = root / "art"
    proc = run("compile", str(model_dir), "--preset", "w4-s0.45", "--calib", str(text), "--calib-samples", "4",
               "--seq-len", "32", "--tune-trials", "2", "--decode-steps", "128", "--out", str(out), "--json", check_rc=0)  # 2: tuning curves
    return out, json.loads(proc.stdout)


@pytest.mark.slow
def test_compile_json(compiled_dir):
    out, res = compiled_dir
    assert res["quantized_layers"] == 14 and res["linear_layers"] == 15
    assert res["config"]["bits"] == 4 and 4.0 < res["bits_per_weight"] < 12  # 64-wide rows: fp16 tables add 4 b/w
    assert (out / "tokenizer").is_dir() and (out / "manifest.json").exists()


@pytest.mark.slow
def test_eval_with_baseline(compiled_dir, workspace):
    out, _ = compiled_dir
    _, _, text = workspace
    res = json.loads(run("eval", str(out), "--text", str(text), "--windows", "2", "--seq-len", "32", "--baseline",
                         "--json", check_rc=0).stdout)
    assert res["windows"] == 2
    # the figures are the perplexities of the artifact and of its float source on the same windows, computed
    # here independently of sqc.real (next-token cross-entropy over every window, exponentiated)
    from transformers import AutoTokenizer, LlamaForCausalLM

    from sqc.real import eval_windows

    _, model_dir, _ = workspace
    windows = torch.cat(eval_windows(AutoTokenizer.from_pretrained(out / "tokenizer"), 2, 32, text=text.read_text()))

    def ppl(model) -> float:
        with torch.no_grad():
            logits = model(windows, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
        return float(torch.exp(nll))

    assert res["ppl"] == pytest.approx(ppl(sqc.load(out)), rel=1e-4)
    assert res["baseline_ppl"] == pytest.approx(ppl(LlamaForCausalLM.from_pretrained(model_dir)), rel=1e-4)
    assert res["ppl"] != res["baseline_ppl"]  # the quantized model is a different function


@pytest.mark.slow
def test_generate_and_bench(compiled_dir):
    out, _ = compiled_dir
    res = json.loads(run("generate", str(out), "--prompt", "the quick", "--max-new-tokens", "5", "--json",
                         check_rc=0).stdout)
    assert res["new_tokens"] <= 5 and res["text"].startswith("the quick")
    # the artifact carries a decode step for 128 cache slots: the fresh process restored it, traced nothing
    assert "b1-c128-greedy.bin restored" in res["decode"]["stored_step"], res["decode"]
    res = json.loads(run("bench", str(out), "--prompt-len", "16", "--new-tokens", "4", "--json", check_rc=0).stdout)
    for k in ("sqc", "float"):
        assert res[k]["prefill_tok_s"] > 0 and res[k]["decode_tok_s"] > 0


@pytest.mark.slow
def test_progress_lines_when_not_a_tty(workspace, tmp_path):
    _, model_dir, text = workspace
    proc = run("compile", str(model_dir), "--preset", "w3", "--calib", str(text), "--calib-samples", "3",
               "--seq-len", "32", "--decode-steps", "none", "--out", str(tmp_path / "a"), check_rc=0)
    # the default is lazy loading: the layer-streamed pipeline reports per decoder layer
    assert "calibration forward: 2/2" in proc.stderr and "calibration backward + fit: 2/2" in proc.stderr
    assert "compiled 14/15 linear layers" in proc.stdout
    proc = run("compile", str(model_dir), "--preset", "w3", "--calib", str(text), "--calib-samples", "3",
               "--seq-len", "32", "--decode-steps", "none", "--out", str(tmp_path / "b"), "--no-lazy", check_rc=0)
    assert "calibration backward + fit: 2/2" in proc.stderr  # streamed too: the model is a decoder stack


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,rc,msg",
    [
        (["compile", "/no/such/model", "--out", "X", "--no-calib"], 1, "does not exist"),
        (["compile", "MODEL", "--preset", "w9", "--out", "X"], 2, "invalid choice: 'w9'"),
        (["compile", "MODEL", "--out", "X", "--no-calib", "--bits", "9"], 2, "bits must be an integer in 2..8"),
        (["compile", "MODEL", "--out", "X", "--no-calib", "--target", "metal"], 2, "unknown target"),
        (["compile", "MODEL", "--out", "EXISTING", "--no-calib"], 1, "exists; pass --force"),
        (["compile", "MODEL", "--out", "X"], 2, "give --calib TEXTFILE"),
        (["compile", "MODEL", "--out", "X", "--no-calib", "--preset", "w3-s0.45-g"], 2, "needs calibration data"),
        (["compile", "MODEL", "--out", "X", "--no-calib", "--fit", "guided"], 2, "needs calibration data"),
        (["compile", "MODEL", "--out", "X", "--no-calib", "--bpw", "4.5"], 2, "width from calibration data"),
        (["compile", "MODEL", "--out", "X", "--no-calib", "--preset", "b3.5"], 2, "width from calibration data"),
        (["compile", "NOTAMODEL", "--out", "X", "--no-calib"], 1, "not a Hugging Face model folder"),
        (["compile", "MODEL", "--out", "MODEL", "--no-calib", "--force"], 1, "is not an sqc artifact"),
        (["eval", "/no/such/dir", "--text", "T"], 1, "is not an sqc artifact folder"),
        (["frobnicate"], 2, "invalid choice"),
        (["eval", "/no/such/dir", "--text", "T", "--windows", "0"], 2, "must be at least 1"),
        (["compile", "MODEL", "--out", "X", "--calib-samples", "-3"], 2, "must be at least 1"),
    ],
)
def test_errors(workspace, tmp_path, args, rc, msg):
    _, model_dir, text = workspace
    (tmp_path / "EXISTING").mkdir()
    (tmp_path / "NOTAMODEL").mkdir()
    subst = {"MODEL": str(model_dir), "X": str(tmp_path / "x"), "EXISTING": str(tmp_path / "EXISTING"),
             "NOTAMODEL": str(tmp_path / "NOTAMODEL"), "T": str(text)}
    proc = run(*[subst.get(a, a) for a in args])
    assert proc.returncode == rc, (proc.stdout, proc.stderr)
    assert msg in proc.stderr
    if rc == 2 and args[0] in ("compile", "eval"):  # the subcommand's usage, not the top level's
        assert f"usage: sqc {args[0]}" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_report_in_headless_chromium(compiled_dir, tmp_path):
    """The HTML report loads in a real browser with its plots and table and no console errors."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out, _ = compiled_dir
    curve = tmp_path / "quality.json"  # the shape benchmarks/quality.py --curve writes
    curve.write_text(json.dumps({"curve": {
        "budgets": [{"bits_per_weight": b, "ppl": 30 - 3 * b, "heldout_ppl": 40 - 4 * b} for b in (3.0, 4.0, 5.0)],
        "uniform": [{"preset": "w4-s0.45", "bits_per_weight": 4.6, "ppl": 17.0, "heldout_ppl": 23.0}],
        "fp32": {"ppl": 14.0, "heldout_ppl": 18.0}}}))
    res = json.loads(run("report", str(out), "--latency", "--repeats", "3", "--curve", str(curve), "--json",
                         check_rc=0).stdout)
    page = res["report"]
    latency = json.load(open(out / "latency.json"))
    assert {r["batch"] for r in latency} == {1, 8, 64} and all(r["sqc_ms"] > 0 for r in latency)
    assert os.path.exists(page)
    html_text = open(page).read()
    import re

    # self-contained: nothing is fetched (namespace URIs inside the SVG are not fetches)
    assert not re.search(r"""(src|href)\s*=\s*["']https?://""", html_text)
    assert "<link" not in html_text and "<script" not in html_text

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-quic", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'prof'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path="/usr/bin/chromedriver"))
    try:
        driver.set_window_size(1400, 1000)
        driver.get("file://" + page)
        assert driver.title == "sqc report"
        # the per-layer plots (error and sparse fraction; bits breakdown), the tuning curves, kernel latency,
        # the size-quality curve with this model marked
        assert len(driver.find_elements(By.CSS_SELECTOR, "figure svg")) == 5
        assert "Size and quality" in driver.page_source
        assert len(driver.find_elements(By.CSS_SELECTOR, "#kernels tbody tr")) >= 3
        assert len(driver.find_elements(By.CSS_SELECTOR, "#layers tbody tr")) == 15
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_report_on_non_artifact(tmp_path):
    proc = run("report", str(tmp_path))
    assert proc.returncode == 1 and "not an sqc artifact" in proc.stderr


def test_report_with_a_file_that_is_not_a_curve(compiled_dir, tmp_path):
    (tmp_path / "q.json").write_text('{"settings": {}}')
    proc = run("report", str(compiled_dir[0]), "--curve", str(tmp_path / "q.json"))
    assert proc.returncode == 1 and "not a quality.json with a size-quality curve" in proc.stderr


def test_cuda_target_without_nvcc(workspace, tmp_path):
    _, model_dir, _ = workspace
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    proc = subprocess.run(
        [sys.executable, "-m", "sqc", "compile", str(model_dir), "--no-calib", "--target", "cuda -arch=sm_86",
         "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 1 and "needs nvcc on PATH" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_leaves_no_half_written_artifact(workspace, tmp_path):
    import signal
    import time

    _, model_dir, text = workspace
    out = tmp_path / "x"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqc", "compile", str(model_dir), "--calib", str(text), "--calib-samples", "2000",
         "--seq-len", "64", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    # wait until calibration is under way, then interrupt
    line = ""
    while time.time() < deadline and "calibration" not in line:
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-1000:]
    assert "interrupted; nothing was written" in err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".sqc-")]


@pytest.mark.slow
def test_flags_reach_the_config(workspace, tmp_path):
    _, model_dir, _ = workspace
    res = json.loads(run("compile", str(model_dir), "--no-calib", "--bits", "3", "--outlier-pct", "1.0",
                         "--table-dtype", "float32", "--skip", "model.layers.1.*", "--decode-steps", "none", "--out", str(tmp_path / "a"),
                         "--json", check_rc=0).stdout)
    assert res["config"]["bits"] == 3 and res["config"]["outlier_pct"] == 1.0
    assert res["config"]["table_dtype"] == "float32" and res["config"]["skip"] == ["model.layers.1.*"]
    assert res["quantized_layers"] == 7


@pytest.mark.slow
def test_a_bits_budget_from_the_command_line(workspace, tmp_path):
    _, model_dir, text = workspace
    res = json.loads(run("compile", str(model_dir), "--bpw", "5.5", "--calib", str(text), "--calib-samples", "2",
                         "--seq-len", "32", "--no-tune", "--decode-steps", "none", "--out", str(tmp_path / "a"),
                         "--json", check_rc=0).stdout)
    assert res["config"]["bits_per_weight"] == 5.5
    assert 5.0 < res["bits_per_weight"] <= 5.5  # the artifact's stored bits per weight


@pytest.mark.slow
def test_smollm2_compile_eval_bench_generate_report(tmp_path):
    from sqc.real import DOC_SOURCES

    out = tmp_path / "smol"
    # four quantized decoder layers (the demo test compiles all 30): the same kernel shapes and preset as the
    # demo's, so the session's kernel cache and tuning database serve both
    skip = [a for p in ("model.layers.[4-9].*", "model.layers.[12]?.*") for a in ("--skip", p)]
    res = json.loads(run("compile", "smollm2", "--preset", "w3-s0.45", "--calib-samples", "2", "--seq-len", "64",
                         *skip, "--decode-steps", "none", "--out", str(out), "--json", check_rc=0).stdout)
    assert res["quantized_layers"] == 28
    # every layer runs a generated kernel: its own, or its fused group's (q/k/v, gate/up)
    assert all(k.startswith(("tvm-lut-avx512", "tvm-lut-avx2")) for k in res["kernels"]), res["kernels"]
    assert any("(fused q_proj+k_proj+v_proj)" in k for k in res["kernels"])
    # a second compile of the same model finds every kernel in the tuning database and the kernel cache
    again = json.loads(run("compile", "smollm2", "--preset", "w3-s0.45", "--no-calib", *skip, "--decode-steps", "none", "--out",
                           str(tmp_path / "again"), "--json", check_rc=0).stdout)
    assert again["tuning"] and all(k["from_db"] for k in again["tuning"])
    assert again["kernel_stats"]["builds"] == 0 and again["kernel_stats"]["searches"] == 0
    text = os.path.join(DOC_SOURCES, "tutorial", "introduction.rst.txt")
    res = json.loads(run("eval", str(out), "--text", text, "--windows", "1", "--seq-len", "128", "--json",
                         check_rc=0).stdout)
    from transformers import AutoTokenizer

    from sqc.real import eval_windows

    loaded = sqc.load(out)

    window = eval_windows(AutoTokenizer.from_pretrained(out / "tokenizer"), 1, 128, text=open(text).read())[0]
    with torch.no_grad():
        logits = loaded(window, use_cache=False).logits.float()
    want = float(torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:])))
    assert res["ppl"] == pytest.approx(want, rel=1e-4) and res["ppl"] < 100  # and in SmolLM2's range on prose
    res = json.loads(run("generate", str(out), "--prompt", "def main():", "--max-new-tokens", "4", "--json",
                         check_rc=0).stdout)
    assert res["text"].startswith("def main():")
    res = json.loads(run("bench", str(out), "--prompt-len", "32", "--new-tokens", "2", "--json", check_rc=0).stdout)
    assert res["sqc"]["weight_bytes"]["packed_after"] < res["sqc"]["weight_bytes"]["float_before"] / 6  # 3.45 bits/weight
    res = json.loads(run("report", str(out), "--json", check_rc=0).stdout)
    assert os.path.getsize(res["report"]) > 50_000


@pytest.mark.slow
def test_architecture_sqc_cannot_compile(tmp_path, workspace):
    """A real HF folder (tiny GPT-2) whose projections are transformers Conv1D: a clear error, exit 1."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, model_dir, _ = workspace
    d = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=64,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(d)
    for f in os.listdir(model_dir):  # the tiny LLaMA's tokenizer files
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(model_dir / f, d / f)
    proc = run("compile", str(d), "--no-calib", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr
    assert "GPT2LMHeadModel has no linear layer sqc can quantize" in proc.stderr
    assert "Conv1D" in proc.stderr and "lm_head" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ctrl_c_after_the_artifact_is_complete_says_so(workspace, tmp_path, monkeypatch, capsys):
    import sqc.report_html
    from sqc import cli

    _, model_dir, _ = workspace

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sqc.report_html, "write_report", interrupted)
    rc = cli.main(["compile", str(model_dir), "--no-calib", "--no-tune", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "was written completely; it is usable" in err and "nothing was written" not in err
    assert (tmp_path / "x" / "manifest.json").exists()


@pytest.mark.slow
def test_ctrl_c_swallowed_by_a_library_callback_still_stops_the_run(workspace, tmp_path, monkeypatch, capsys):
    import signal

    import sqc
    from sqc import cli

    _, model_dir, _ = workspace
    real = sqc.compile

    def compile_with_swallowed_interrupt(*a, **k):
        try:  # as JAX's garbage-collection callback does: the exception is caught and dropped
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return real(*a, **k)

    monkeypatch.setattr(sqc, "compile", compile_with_swallowed_interrupt)
    rc = cli.main(["compile", str(model_dir), "--no-calib", "--no-tune", "--out", str(tmp_path / "y"), "--quiet"])
    assert rc == 1 and "interrupted" in capsys.readouterr().err
