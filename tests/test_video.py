"""Video bundles: InstructBlipVideo checkpoints (and image checkpoints loaded as video models)
through the same two graphs, frames as the batch axis.

The reference is transformers' own ``InstructBlipVideoForConditionalGeneration`` fed with the
runtime's preprocessed frames (transformers' video processor needs torchvision, which does not
import beside this torch) and with ids expanded here the way ``InstructBlipVideoProcessor``'s
code expands them (``<video>`` x num_query_tokens x 4, then the prompt's own tokens).
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from ib_edge.runtime import Pipeline
from ib_edge.runtime.errors import BundleError, InputError
from ib_edge.runtime.manifest import Manifest
from ib_edge.runtime.video import load_frames, sample_indices

from .conftest import FAMILIES

PROMPTS = ["Describe this video.", "What color is the circle?", "How many shapes are there?",
           "is the square on the left or the right", "What happens next?"]
SIZES = [(224, 224), (97, 301), (640, 480), (50, 50), (333, 222)]


@pytest.fixture(scope="module")
def video_ref(tmp_path_factory):
    from ib_edge.export.reference_models import save_reference

    root, cache = tmp_path_factory.mktemp("video-ref"), {}

    def get(family):
        if family not in cache:
            cache[family] = save_reference(family, root / family, seed=0, video=True)
        return cache[family]
    return get


@pytest.fixture(scope="module")
def video_bundle(tmp_path_factory, video_ref):
    from ib_edge.export.bundle import export_bundle

    root, cache = tmp_path_factory.mktemp("video-bundles"), {}

    def get(family):
        if family not in cache:
            cache[family] = export_bundle(str(video_ref(family)), root / family, quiet=True)
        return cache[family]
    return get


def _frame_sets(n, frames=4, seed=0):
    """n sets of random frames; each set's frames differ in size and content."""
    rng = np.random.default_rng(seed)
    return [[Image.fromarray(rng.integers(0, 256, (SIZES[(i + k) % 5][1], SIZES[(i + k) % 5][0], 3), dtype=np.uint8))
             for k in range(frames)] for i in range(n)]


def _hf(path, placeholder=None):
    from transformers import AutoTokenizer, InstructBlipVideoForConditionalGeneration

    model = InstructBlipVideoForConditionalGeneration.from_pretrained(str(path), use_safetensors=True).eval()
    if placeholder is not None:  # an image checkpoint loaded as video: transformers needs the token set
        model.config.video_token_index = placeholder
    tok = AutoTokenizer.from_pretrained(str(path))
    qtok = AutoTokenizer.from_pretrained(str(path), subfolder="qformer_tokenizer")
    return model, tok, qtok


def _processor_ids(model, tok, qtok, prompt, token="<video>", frames=4):
    """InstructBlipVideoProcessor's text path, as its code does it: the video tokens tokenized
    without specials, concatenated in front of the prompt's tokens; the Q-Former sees the prompt."""
    video = tok(token * model.config.num_query_tokens * frames, add_special_tokens=False)["input_ids"]
    q = qtok(prompt)
    return video + tok(prompt)["input_ids"], q["input_ids"], q["attention_mask"]


def _hf_generate(model, pv, ids, qids, qmask, **gen):
    with torch.no_grad():
        out = model.generate(pixel_values=torch.from_numpy(pv)[None], qformer_input_ids=torch.tensor([qids]),
                             qformer_attention_mask=torch.tensor([qmask]), input_ids=torch.tensor([ids]),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False, **gen)
    if not model.config.text_config.is_encoder_decoder:
        out = out[:, len(ids):]
    return out[0].tolist()


def _hf_video_features(model, pv, qids, qmask):
    with torch.no_grad():
        return model.get_video_features(torch.from_numpy(pv)[None], qformer_input_ids=torch.tensor([qids]),
                                        qformer_attention_mask=torch.tensor([qmask])).pooler_output.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, video_ref, video_bundle):
    """5 frame sets x this family: the bundle's greedy tokens equal the model's own generate."""
    model, tok, qtok = _hf(video_ref(family))
    pipe = Pipeline.load(video_bundle(family))
    assert pipe.manifest.model["kind"] == "video" and pipe.manifest.frames == 4
    assert pipe.manifest.model["video_token_id"] == tok.convert_tokens_to_ids("<video>") == model.config.video_token_index
    answers = set()
    for frames, prompt in zip(_frame_sets(5), PROMPTS):
        ids, qids, qmask = _processor_ids(model, tok, qtok, prompt)
        enc = pipe.prompts.encode(prompt, frames=4)
        assert enc["input_ids"][0].tolist() == ids
        assert enc["qformer_input_ids"][0].tolist() == qids
        pv = pipe.video_pixel_values(frames)
        ref = _hf_generate(model, pv, ids, qids, qmask, max_new_tokens=8)
        res = pipe.run(video=frames, prompt=prompt, max_new_tokens=8)
        assert res.token_ids == ref, (family, prompt)
        answers.add(tuple(ref))
    assert len(answers) >= 2, "reference model too degenerate for a meaningful comparison"


@pytest.mark.parametrize("frames", [4, 2])
def test_graph_parity_at_frame_counts(frames, video_ref, video_bundle):
    """The graphs take the frames as their batch axis: the spliced query embeddings equal
    transformers' get_video_features at the bundle's 4 frames and at 2; frame order matters."""
    model, tok, qtok = _hf(video_ref("llama"))
    pipe = Pipeline.load(video_bundle("llama"))
    prompt = "What shape is the red object?"
    _, qids, qmask = _processor_ids(model, tok, qtok, prompt)
    enc = pipe.prompts.encode(prompt, frames=4)
    pv = np.concatenate([pipe.pixel_values(s) for s in _frame_sets(1, frames, seed=frames)])
    ours = pipe.frame_query_embeds(pipe.image_embeds(pv), enc)
    ref = _hf_video_features(model, pv, qids, qmask)
    assert ours.shape == ref.shape == (1, frames * model.config.num_query_tokens, 128)
    np.testing.assert_allclose(ours, ref, atol=2e-5 * np.abs(ref).max())
    swapped = _hf_video_features(model, pv[::-1].copy(), qids, qmask)
    assert np.abs(swapped - ref).max() > 100 * np.abs(ours - ref).max()


def test_image_checkpoint_as_video(reference_dir, tmp_path):
    """ib-export --video on an image InstructBLIP checkpoint: its <image> token is the video
    placeholder; greedy tokens equal InstructBlipVideoForConditionalGeneration loaded from the
    same image checkpoint (as transformers' docs load it)."""
    from ib_edge.export.bundle import export_bundle

    ckpt = reference_dir("t5")
    bundle = export_bundle(str(ckpt), tmp_path / "b", video=True, quiet=True)
    manifest = Manifest.load(bundle)
    image_token = json.loads((ckpt / "config.json").read_text())["image_token_index"]
    assert manifest.model["kind"] == "video" and manifest.model["video_token_id"] == image_token
    model, tok, qtok = _hf(ckpt, placeholder=image_token)
    pipe = Pipeline.load(bundle)
    for frames, prompt in zip(_frame_sets(2, seed=9), PROMPTS[:2]):
        ids, qids, qmask = _processor_ids(model, tok, qtok, prompt, token="<image>")
        assert pipe.prompts.encode(prompt, frames=4)["input_ids"][0].tolist() == ids
        ref = _hf_generate(model, pipe.video_pixel_values(frames), ids, qids, qmask, max_new_tokens=6)
        assert pipe.run(video=frames, prompt=prompt, max_new_tokens=6).token_ids == ref


def test_sample_indices_lavis():
    # LAVIS load_video, sampling="uniform": np.arange(0, vlen, vlen / n_frms).astype(int)
    assert sample_indices(10, 4) == [0, 2, 5, 7]
    assert sample_indices(7, 4) == [0, 1, 3, 5]
    assert sample_indices(4, 4) == [0, 1, 2, 3]
    assert sample_indices(100, 4) == [0, 25, 50, 75]


def _coloured(n, size=(64, 48)):
    return [Image.new("RGB", size, (25 * i, 255 - 25 * i, 7)) for i in range(n)]


def test_gif_frames_sampled_evenly(tmp_path):
    frames = _coloured(10)
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    got = load_frames(str(path), 4)
    assert [np.asarray(f)[0, 0, 0] // 25 for f in got] == [0, 2, 5, 7]
    assert load_frames(path.read_bytes(), 4)[1].size == (64, 48)


def test_mp4_and_webm_through_pyav(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")
    for name, codec in (("clip.mp4", "mpeg4"), ("clip.webm", "libvpx")):
        path = tmp_path / name
        with av.open(str(path), "w") as c:
            s = c.add_stream(codec, rate=10)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            for f in _coloured(10):
                for p in s.encode(av.VideoFrame.from_image(f)):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        got = load_frames(str(path), 4)
        # lossy codecs: the red channel within a few levels of 0, 50, 125, 175
        reds = [int(np.asarray(f)[20:28, 28:36, 0].mean()) for f in got]
        assert all(abs(r - 25 * i) < 12 for r, i in zip(reds, [0, 2, 5, 7])), (name, reds)


def test_missing_pyav_is_one_line(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(InputError, match="PyAV is not installed"):
        load_frames(str(path), 4)


def _ib_run(capsys, *argv):
    from ib_edge.runtime import cli

    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_frames_and_video_file(video_bundle, tmp_path, capsys):
    bundle = video_bundle("llama")
    frames = _frame_sets(1, seed=3)[0]
    paths = []
    for i, f in enumerate(frames):
        paths.append(str(tmp_path / f"f{i}.png"))
        f.save(paths[-1])
    pipe = Pipeline.load(bundle)
    want = pipe.run(video=paths, prompt=PROMPTS[0], max_new_tokens=6).answer
    capsys.readouterr()
    argv = ["--bundle", str(bundle), "--max-new-tokens", "6", "--json"]
    rc, out, err = _ib_run(capsys, *argv, *sum((["--frame", p] for p in paths), []), PROMPTS[0], PROMPTS[1])
    assert rc == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["prompt"] for x in lines] == PROMPTS[:2] and lines[0]["answer"] == want
    gif = tmp_path / "clip.gif"  # 4 frames: sampled indices 0..3, the frames themselves (palette-quantized)
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    rc, out, err = _ib_run(capsys, *argv, str(gif), PROMPTS[0])
    assert rc == 0, err
    assert json.loads(out)["answer"] == pipe.run(str(gif), PROMPTS[0], max_new_tokens=6).answer


def test_cli_bad_video_inputs(video_bundle, bundle_dir, tmp_path, capsys):
    bundle = str(video_bundle("llama"))
    f = tmp_path / "f.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(f)
    gif = tmp_path / "clip.gif"
    _coloured(6)[0].save(gif, save_all=True, append_images=_coloured(6)[1:])
    bad_gif = tmp_path / "bad.gif"
    bad_gif.write_bytes(gif.read_bytes()[:60])  # cut inside the first frame
    garbage_gif = tmp_path / "garbage.gif"
    garbage_gif.write_bytes(b"GIF89a" + bytes(range(256)) * 3)
    bad_mp4 = tmp_path / "bad.mp4"
    bad_mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    cases = {
        "got 2 frames; this video bundle takes 4": ["--bundle", bundle, "--frame", str(f), "--frame", str(f), "Q?"],
        "image not found": ["--bundle", bundle, *["--frame", str(f)] * 3, "--frame", str(tmp_path / "no.png"), "Q?"],
        "still image, not a video": ["--bundle", bundle, str(f), "Q?"],
        "cannot decode video": ["--bundle", bundle, str(bad_gif), "Q?"],
        "garbage.gif": ["--bundle", bundle, str(garbage_gif), "Q?"],
        "bad.mp4": ["--bundle", bundle, str(bad_mp4), "Q?"],
        "video not found": ["--bundle", bundle, str(tmp_path / "none.mp4"), "Q?"],
        "image model: it takes one image, not video frames": ["--bundle", str(bundle_dir("llama")),
                                                             *["--frame", str(f)] * 4, "Q?"],
    }
    capsys.readouterr()  # the fixtures' export output
    for want, argv in cases.items():
        rc, out, err = _ib_run(capsys, *argv)
        assert rc == 2 and out == "", (want, rc, err)
        assert len(err.strip().splitlines()) == 1 and want in err, (want, err)


def test_manifest_video_fields(video_bundle, bundle_dir, tmp_path):
    import shutil

    assert Manifest.load(bundle_dir("llama")).frames is None  # an image bundle (written before the field too)
    src = video_bundle("opt")
    for edit, field in ((lambda m: m.update(frames=0), "model.frames"),
                        (lambda m: m.pop("frames"), "model.frames"),
                        (lambda m: m.update(kind="audio"), "model.kind"),
                        (lambda m: m.update(video_token_id=m["image_token_id"] + 1), "model.video_token_id")):
        dst = tmp_path / field.replace(".", "_") / str(id(edit))
        shutil.copytree(src, dst)
        data = json.loads((dst / "manifest.json").read_text())
        edit(data["model"])
        (dst / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(BundleError, match=field.replace(".", r"\.")):
            Manifest.load(dst)
    old = tmp_path / "old"
    shutil.copytree(bundle_dir("opt"), old)
    data = json.loads((old / "manifest.json").read_text())
    data["model"].pop("kind")
    (old / "manifest.json").write_text(json.dumps(data))
    assert Manifest.load(old).frames is None


def test_pipeline_refuses_mismatched_inputs(video_bundle, bundle_dir):
    frames = _frame_sets(1)[0]
    pipe = Pipeline.load(video_bundle("llama"))
    with pytest.raises(InputError, match="takes 4 frames"):
        pipe.generate(frames[0], "Q?")
    with pytest.raises(InputError, match="got 3 frames"):
        pipe.generate(video=frames[:3], prompt="Q?")
    with pytest.raises(InputError, match="not both"):
        pipe.generate(frames[0], "Q?", video=frames)
    with pytest.raises(InputError, match="image model"):
        Pipeline.load(bundle_dir("llama")).generate(video=frames, prompt="Q?")


def test_eval_file_video_entries(tmp_path):
    from ib_edge.bench.bench import BenchConfig, load_examples
    from ib_edge.bench.proof_task import read_eval_set

    for i, f in enumerate(_coloured(4)):
        f.save(tmp_path / f"f{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"frames": [f"f{i}.png" for i in range(4)], "question": "Q?", "answer": "left",
                                "type": "motion"}) + "\n"
                    + json.dumps({"image": "img.png", "question": "Q?", "answer": "red"}) + "\n")
    rows = read_eval_set(path)
    assert rows[0]["frames"] == [str(tmp_path / f"f{i}.png") for i in range(4)] and "image" not in rows[0]
    examples, _ = load_examples(BenchConfig(bundles=(), eval_file=str(path)))
    assert len(examples[0]["image"]) == 4 and examples[0]["image"][2].getpixel((0, 0)) == (50, 205, 7)
    for bad, msg in (({"frames": [], "question": "q", "answer": "a"}, "frames must be"),
                     ({"frames": ["a.png"], "image": "b.png", "question": "q", "answer": "a"}, "both image and frames")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=msg):
            read_eval_set(path)


def _http(method, url, body=None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_video_bundle_takes_frames(video_bundle):
    """ib-serve on a video bundle: the image_url parts are its frames, in order."""
    import uvicorn

    from ib_edge.serve.app import create_app
    from ib_edge.serve.cli import bind
    from ib_edge.serve.options import ServeOptions

    bundle = video_bundle("llama")
    app = create_app(ServeOptions(bundle=str(bundle), port=0, model_name="vid", max_batch=4))
    sock = bind("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    try:
        for _ in range(1200):
            if srv.started and _http("GET", base + "/health")[0] == 200:
                break
            time.sleep(0.1)
        frames = _frame_sets(1, seed=11)[0]

        def url(img):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

        def body(imgs):
            return {"model": "vid", "max_tokens": 6, "messages": [{"role": "user", "content": [
                *({"type": "image_url", "image_url": {"url": url(i)}} for i in imgs),
                {"type": "text", "text": PROMPTS[0]}]}]}

        want = Pipeline.load(bundle).run(video=frames, prompt=PROMPTS[0], max_new_tokens=6).answer
        status, r = _http("POST", base + "/v1/chat/completions", body(frames))
        assert status == 200, r
        assert r["choices"][0]["message"]["content"] == want
        status, r = _http("POST", base + "/v1/chat/completions", body(frames[:2]))
        assert status == 400 and "takes 4 frames" in r["error"]["message"], r
    finally:
        srv.should_exit = True
        th.join(30)


def test_bench_on_a_video_bundle(video_bundle, tmp_path):
    """ib-bench end to end on a video bundle with a frames eval file: predictions through the
    bundle's frames path, the same answers as the pipeline, no transformers baseline."""
    from ib_edge.bench.bench import BenchConfig, run_bench

    frames = _frame_sets(2, seed=5)
    rows = []
    for i, fs in enumerate(frames):
        names = []
        for k, f in enumerate(fs):
            names.append(f"s{i}f{k}.png")
            f.save(tmp_path / names[-1])
        rows.append({"frames": names, "question": PROMPTS[i], "answer": "left", "type": "motion"})
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = str(video_bundle("llama"))
    report = run_bench(BenchConfig(bundles=(bundle,), eval_file=str(path), runs=1, warmup=0, max_new_tokens=3,
                                   bandwidth_mb=16, progress=False), log=lambda m: None)
    preds = report["bundles"][0]["predictions"]
    pipe = Pipeline.load(bundle)
    assert [p["token_ids"] for p in preds] == [pipe.run(video=fs, prompt=q, max_new_tokens=3).token_ids
                                               for fs, q in zip(frames, PROMPTS)]
    assert preds[0]["image"] == [str(tmp_path / n) for n in rows[0]["frames"]]
    assert "video bundle" in report["baselines"]["transformers_fp32_eager"]["reason"]
