"""A lora-ref batched graph on a real Triton Inference Server (loopback), against PEFT.

Runs with LORA_REF_TRITON=1 (scripts/test_triton.sh installs tritonclient and the
``tritonserver`` binary of nvidia-pytriton, which ships the python backend only: the models
run on :mod:`lora_ref.export.triton_python_model`, ONNX Runtime in the python backend, as a
stand-in for Triton's ONNX Runtime backend, with the same repository layout and config).

* every config.pbtxt written parses with Triton's own ``model_config`` protobufs (from
  tritonclient), with the fields we meant; a malformed one is refused;
* 8 concurrent clients, 4 adapters + the base model, lengths 3..20 (right-padded to 16 or
  32 by the client): every response equals the graph run in-process on that request alone
  (same length, no padding, batch of 1) bit for bit, and the served graph, fed the padded
  batch, matches PEFT's float64 layers at every LoRA site within the derived bound
  (tests/test_peers_onnx.py's check, lora_ref.export.parity.site_bound); the server's
  metrics show runs that joined requests of several adapters;
* adapter names and indices outside [-1, N) are client errors naming the index and N (in the
  helper, and from the server when sent unchecked);
* a new version (adapters removed and reordered) is loaded while clients keep sending: no
  request fails, and the client moves to the new map.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import require_peer

pytestmark = pytest.mark.skipif(os.environ.get("LORA_REF_TRITON") != "1",
                                reason="Triton server tests run with LORA_REF_TRITON=1 (bash scripts/test_triton.sh)")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "peft_to_onnx.py"
LENGTHS = [3, 7, 16, 5, 12, 9, 20, 4]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch = require_peer("torch")
    require_peer("peft")
    require_peer("tritonclient.grpc")
    from lora_ref import load_adapter
    from lora_ref.export import build_graph
    from lora_ref.export.triton import TritonOptions, write_repository
    from lora_ref.export.triton_local import LocalServer, TritonUnavailableError, python_stand_in, pytriton_root

    try:
        pytriton_root()  # the binary only: nvidia-pytriton is installed --no-deps, its Python API is not importable
    except TritonUnavailableError as exc:
        pytest.fail(f"LORA_REF_TRITON=1 but {exc}")

    spec = importlib.util.spec_from_file_location("peft_to_onnx", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    work = tmp_path_factory.mktemp("triton")
    base = example.tiny_llama()
    dirs = [example.make_adapter(base, work / f"adapter_{k}", r=r, alpha=2 * r, seed=20 + k) for k, r in enumerate((2, 4, 8, 4))]
    ids = example.example_ids(base.config.vocab_size)
    program = torch.onnx.export(example.LogitsOnly(base).eval(), (ids,), dynamo=True, input_names=["input_ids"],
                                output_names=["logits"], dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}})
    program.save(str(work / "llama.onnx"))
    import onnx

    adapters = [load_adapter(d, name=d.name) for d in dirs]
    graph, sites = build_graph(onnx.load(str(work / "llama.onnx")), adapters, "batched")
    options = TritonOptions(max_batch_size=8, preferred_batch_sizes=(8,), queue_delay_us=100_000)
    repo = work / "repo"
    write_repository(graph, repo, [a.name for a in adapters], name="llama", options=options)
    served = python_stand_in(repo, work / "served")
    with LocalServer(served, poll_seconds=1, log=work / "server.log") as server:
        server.wait_ready(["llama"], timeout=120)
        yield {"example": example, "base": base, "dirs": dirs, "adapters": adapters, "repo": repo, "served": served,
               "server": server, "sites": sites, "options": options, "graph": graph, "work": work}


def _client(setup):
    from lora_ref.export.triton_client import LoraTritonClient

    return LoraTritonClient(setup["server"].grpc_url, "llama")


def test_written_configs_parse_with_tritons_protobufs(setup, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from lora_ref.export.triton import TritonOptions, write_repository

    variants = {"cpu": TritonOptions(), "cuda": TritonOptions(accelerator="cuda", instances=2),
                "trt": TritonOptions(accelerator="tensorrt", precision="FP16", warmup=False, intra_op_threads=4)}
    names = [a.name for a in setup["adapters"]]
    for key, options in variants.items():
        write_repository(setup["graph"], tmp_path, names, name=key, options=options)
    configs = {p.parent.name: p for p in [*tmp_path.glob("*/config.pbtxt"), setup["repo"] / "llama" / "config.pbtxt",
                                          setup["served"] / "llama" / "config.pbtxt"]}
    assert len(configs) == 4
    for key, path in configs.items():
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        options = variants.get(key, setup["options"])
        assert config.max_batch_size == options.max_batch_size
        assert (config.platform, config.backend) in (("onnxruntime_onnx", ""), ("", "python"))
        index = next(i for i in config.input if i.name == "adapter_index")
        assert list(index.dims) == [1] and index.HasField("reshape") and list(index.reshape.shape) == []
        assert index.data_type == mc.TYPE_INT64
        ids = next(i for i in config.input if i.name == "input_ids")
        assert list(ids.dims) == [-1] and [o.name for o in config.output] == ["logits"] and list(config.output[0].dims) == [-1, 96]
        assert list(config.dynamic_batching.preferred_batch_size) == list(options.preferred_batch_sizes)
        assert config.dynamic_batching.max_queue_delay_microseconds == options.queue_delay_us
        group = config.instance_group[0]
        assert group.count == options.instances and group.kind == (mc.ModelInstanceGroup.KIND_CPU if options.accelerator is None
                                                                    else mc.ModelInstanceGroup.KIND_GPU)
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accelerators] == (["tensorrt"] if options.accelerator == "tensorrt" else [])
        if accelerators:
            assert accelerators[0].parameters["precision_mode"] == options.precision
        assert config.parameters["intra_op_thread_count"].string_value == str(options.intra_op_threads)
        import json

        assert json.loads(config.parameters["lora_ref.adapters"].string_value)["1"] == {n: i for i, n in enumerate(names)}
        assert len(config.model_warmup) == int(options.warmup)
    text = configs["cpu"].read_text()
    malformed = [text.replace("TYPE_INT64", "TYPE_INT65", 1), text.replace("max_batch_size", "max_batch", 1),
                 text.replace("dims: [ 1 ]", "dims: [ one ]", 1), text[: len(text) // 2]]
    for bad in malformed:
        with pytest.raises(text_format.ParseError):
            text_format.Parse(bad, mc.ModelConfig())


def test_concurrent_clients_with_different_adapters_and_lengths_match_peft(setup):
    from lora_ref.export import open_session

    from test_peers_onnx import _check, _peft_layers

    rng = np.random.default_rng(5)
    vocab = setup["base"].config.vocab_size
    names = [a.name for a in setup["adapters"]] + [None]
    jobs = [(k, names[k % len(names)], rng.integers(0, vocab, length)) for k, length in enumerate(LENGTHS)]
    before = _metrics(setup["server"])
    barrier = threading.Barrier(len(jobs))

    def run(job):
        _, adapter, ids = job
        client = _client(setup)
        barrier.wait(timeout=30)
        return [client.infer(ids, adapter) for _ in range(2)]

    started = time.monotonic()
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = [f.result(timeout=120) for f in [pool.submit(run, job) for job in jobs]]
    print(f"{2 * len(jobs)} requests in {time.monotonic() - started:.2f} s")
    session = open_session(setup["repo"] / "llama" / "1" / "model.onnx")
    index = {name: i for i, name in enumerate(names[:-1])}
    for (k, adapter, ids), got in zip(jobs, answers):
        alone = session.run_batched({"input_ids": ids[None, :]}, [index.get(adapter, -1)])[0][0]
        for response in got:
            assert response.shape == (len(ids), vocab)
            np.testing.assert_array_equal(response, alone, err_msg=f"client {k} ({adapter}, {len(ids)} tokens)")
    after = _metrics(setup["server"])
    runs = after["lora_ref_batches"] - before["lora_ref_batches"]
    assert runs < 2 * len(jobs), "no two requests were joined into one run"
    assert after["lora_ref_max_distinct_adapters"] >= 2, "no run joined requests of different adapters"
    print(f"{2 * len(jobs)} requests in {runs:.0f} runs, up to {after['lora_ref_max_distinct_adapters']:.0f} adapters in one run")
    # the served graph on the padded rows (what the batcher ran) against PEFT's float64 layers, site by site
    layers = {None: None}
    for directory in setup["dirs"]:
        layers[directory.name] = _peft_layers(setup["example"], directory)[1]
    _, base_layers = _peft_layers(setup["example"], setup["dirs"][0])
    for width in (16, 32):
        rows = [(adapter, ids) for _, adapter, ids in jobs if -(-len(ids) // 16) * 16 == width]
        batch = np.zeros((len(rows), width), np.int64)
        for r, (_, ids) in enumerate(rows):
            batch[r, : len(ids)] = ids
        _check(setup["repo"] / "llama" / "1" / "model.onnx", setup["sites"], {"input_ids": batch},
               lambda s, f, rows=rows: s.run_batched(f, [index.get(a, -1) for a, _ in rows]),
               [layers[a] for a, _ in rows], f"served graph, padded to {width}", base_layers)
    # end to end, for the record: the responses against PEFT's float32 logits
    worst = 0.0
    for _, adapter, ids in jobs[: len(names)]:
        want = setup["example"].peft_logits(setup["base"], setup["work"] / adapter if adapter else None,
                                            require_peer("torch").from_numpy(ids[None, :]))[0]
        got = answers[[j[1] for j in jobs].index(adapter)][0]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    print(f"max |Triton - PEFT float32| / max|logits| = {worst:.2e}")


def test_bad_adapters_are_client_errors_naming_the_index_and_n(setup):
    from lora_ref.export import AdapterIndexError
    from lora_ref.export.triton_client import TritonRequestError

    client = _client(setup)
    ids = [1, 2, 3]
    for bad in (4, -2, 2**40):
        with pytest.raises(AdapterIndexError, match=re.escape(f"adapter_index {bad} is outside [-1, 4)")):
            client.infer(ids, bad)
        with pytest.raises(TritonRequestError, match=re.escape(f"adapter_index {bad} is outside [-1, 4)")):
            client.infer(ids, bad, check=False)
    with pytest.raises(AdapterIndexError, match="has no adapter 'nope'"):
        client.infer(ids, "nope")
    assert client.infer(ids, -1).shape == (3, 96)


def test_new_version_loads_while_clients_keep_sending(setup):
    """Version 2 keeps adapter_2 and adapter_0 (in that order): written atomically, loaded by polling, no request lost."""
    from lora_ref.export import build_graph, open_session
    from lora_ref.export.triton import write_repository
    from lora_ref.export.triton_local import python_stand_in

    from lora_ref.export.triton_client import TritonRequestError

    adapters = setup["adapters"]
    client, stale_by_index, stale_by_name = _client(setup), _client(setup), _client(setup)
    ids = np.array([5, 6, 7, 8], np.int64)
    failures: list[Exception] = []
    done = threading.Event()
    answers: list[np.ndarray] = []

    def keep_sending():
        sender = _client(setup)
        while not done.is_set():
            try:
                answers.append(sender.infer(ids, "adapter_0"))
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                failures.append(exc)

    thread = threading.Thread(target=keep_sending)
    thread.start()
    try:
        time.sleep(0.5)
        graph, _ = build_graph(_base_graph(setup), [adapters[2], adapters[0]], "batched")
        write_repository(graph, setup["repo"], [adapters[2].name, adapters[0].name], name="llama", options=setup["options"])
        python_stand_in(setup["repo"], setup["served"])
        setup["server"].wait_ready(["llama"], timeout=60, version=2)
        deadline = time.monotonic() + 30
        while client.version != 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            client.refresh()
        time.sleep(1.5)  # the next poll retires version 1
    finally:
        done.set()
        thread.join(timeout=60)
    assert not failures, f"{len(failures)} requests failed during the version change: {failures[:2]}"
    assert client.version == 2 and client.adapters == {"adapter_2": 0, "adapter_0": 1}
    want = open_session(setup["repo"] / "llama" / "2" / "model.onnx").run_batched({"input_ids": ids[None, :]}, [1])[0][0]
    np.testing.assert_array_equal(client.infer(ids, "adapter_0"), want)
    # clients still pinned to version 1: a name is looked up again in version 2's map, a bare index is refused
    assert stale_by_name.version == 1 and stale_by_index.version == 1
    np.testing.assert_array_equal(stale_by_name.infer(ids, "adapter_0"), want)
    with pytest.raises(TritonRequestError, match="version 1 went away .* adapter_index 0 may name another adapter"):
        stale_by_index.infer(ids, 0)
    assert len(answers) > 2 and all(np.array_equal(a, answers[0]) for a in answers)  # adapter_0 before, during and after


def _base_graph(setup):
    import onnx

    return onnx.load(str(setup["work"] / "llama.onnx"))


def _metrics(server) -> dict[str, float]:
    """lora_ref_* metric values of model llama (0 when absent)."""
    values = {"lora_ref_batches": 0.0, "lora_ref_max_distinct_adapters": 0.0}
    for line in server.metrics().splitlines():
        match = re.match(r'^(lora_ref_\w+)\{model="llama",version="1"\} ([0-9.e+]+)$', line)
        if match and match.group(1) in values:
            values[match.group(1)] = float(match.group(2))
    return values
