"""ArcFace/ONNX encoders, MTCNN landmarks and the five-point alignment geometry."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from celebbasis.errors import InputError
from celebbasis.face import FIVE_POINT, ArcFaceEncoder, Face, FaceAnalyzer, MTCNNDetector, OnnxFaceEncoder
from celebbasis.face.geometry import ARCFACE_TEMPLATE, PAPER_ENCODER_TEMPLATE, arcface_align, similarity_transform
from celebbasis.face.nets import IRESNET_LAYERS, IResNet


@pytest.fixture(scope="module")
def mtcnn():
    return MTCNNDetector()


def test_mtcnn_five_points_on_the_astronaut(mtcnn, astronaut_path, astronaut):
    faces = mtcnn.detect(np.asarray(Image.open(astronaut_path).convert("RGB")))
    assert len(faces) == 1
    f = faces[0]
    (le, re_, nose, ml, mr) = f.landmarks
    x1, y1, x2, y2 = f.box
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in f.landmarks)
    assert le[0] < re_[0] and ml[0] < mr[0]  # image-left first
    assert max(le[1], re_[1]) < nose[1] < min(ml[1], mr[1])  # eyes above the nose tip above the mouth
    dlib_eyes = astronaut.face.key_points()[:2]  # dlib: eye centres from eye corners
    np.testing.assert_allclose(f.landmarks[:2], dlib_eyes, atol=5)


def test_alignment_maps_landmarks_onto_the_template():
    rng = np.random.default_rng(0)
    angle, scale, shift = 0.25, 2.3, np.array([140.0, 90.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = PAPER_ENCODER_TEMPLATE @ (scale * rot).T + shift  # a face somewhere in a photo
    m = similarity_transform(points, PAPER_ENCODER_TEMPLATE)
    np.testing.assert_allclose(points @ m[:, :2].T + m[:, 2], PAPER_ENCODER_TEMPLATE, atol=1e-6)
    # draw a dot at each landmark and warp: the dots must land on the official template within 1 px
    img = Image.new("RGB", (512, 512))
    draw = ImageDraw.Draw(img)
    for i, (x, y) in enumerate(points):
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 40 * i, 0))
    face = Face((0, 0, 512, 512), points + rng.normal(0, 0.0, points.shape), 1.0, FIVE_POINT)
    crop = arcface_align(np.asarray(img), face)
    assert crop.shape == (112, 112, 3)
    red = crop[..., 0].astype(float)
    for i, (tx, ty) in enumerate(PAPER_ENCODER_TEMPLATE):
        ys, xs = np.mgrid[int(ty) - 6 : int(ty) + 7, int(tx) - 6 : int(tx) + 7]
        w = red[ys, xs]
        cx, cy = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()
        assert abs(cx - tx) < 1.0 and abs(cy - ty) < 1.0, (i, cx, cy, tx, ty)


def test_arcface_alignment_needs_five_points(astronaut):
    with pytest.raises(InputError, match="five landmarks"):
        arcface_align(np.asarray(astronaut.image), astronaut.face)  # dlib's layout


@pytest.mark.parametrize("arch, suffix", [("r18", ".pth"), ("r34", ".safetensors")])
def test_arcface_weights_in_insightface_layout(tmp_path, astronaut_path, mirrored_path, arch, suffix):
    torch.manual_seed(0)
    net = IResNet(IRESNET_LAYERS[arch]).eval()
    state = net.state_dict()
    assert "fc.weight" in state and "layer1.0.bn1.weight" in state and "features.running_var" in state
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".pth":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel prefixes are accepted
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    enc = ArcFaceEncoder(path)
    assert enc.embedding_dim == 512 and enc.name.startswith(f"arcface-{arch}:")
    analyzer = FaceAnalyzer(encoder=enc)
    assert isinstance(analyzer.detector, MTCNNDetector)
    a = analyzer(astronaut_path)
    assert a.aligned.shape == (112, 112, 3) and a.embedding.shape == (512,)
    assert np.linalg.norm(a.embedding) == pytest.approx(1.0, abs=1e-5)
    x = torch.from_numpy(a.aligned.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1  # independent forward
    with torch.no_grad():
        ref = net(x)[0].numpy()
    np.testing.assert_allclose(a.embedding, ref / np.linalg.norm(ref), atol=1e-5)


def test_arcface_rejects_other_files(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(InputError, match="not an arcface_torch IResNet"):
        ArcFaceEncoder(path)


def tiny_onnx(path, dim=16, seed=0, *, input_type=None, input_shape=(1, 3, 112, 112), normalise=False):
    """A recognition-shaped ONNX graph: (1, 3, 112, 112) -> Flatten -> Gemm -> (1, dim).

    ``input_type`` other than float adds a Cast to float first; ``normalise`` starts the graph
    with insightface's own Sub/Mul scaling.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(0, 0.01, (3 * 112 * 112, dim)).astype(np.float32)
    nodes, init, x = [], [numpy_helper.from_array(w, "W")], "input.1"
    if input_type is not None:
        nodes.append(helper.make_node("Cast", [x], ["as_float"], to=TensorProto.FLOAT))
        x = "as_float"
    if normalise:
        init += [numpy_helper.from_array(np.float32(127.5), "mean"), numpy_helper.from_array(np.float32(1 / 127.5), "scale")]
        nodes += [helper.make_node("Sub", [x, "mean"], ["centred"]), helper.make_node("Mul", ["centred", "scale"], ["scaled"])]
        x = "scaled"
    graph = helper.make_graph(
        nodes + [helper.make_node("Flatten", [x], ["flat"], axis=1), helper.make_node("Gemm", ["flat", "W"], ["683"])],
        "tiny-recognition",
        [helper.make_tensor_value_info("input.1", input_type or TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, dim])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return w


def test_onnx_backend_runs_an_exported_model(tmp_path, astronaut_path):
    w = tiny_onnx(tmp_path / "w600k_tiny.onnx")
    enc = OnnxFaceEncoder(tmp_path / "w600k_tiny.onnx")
    assert enc.embedding_dim == 16 and enc.name.startswith("onnx-w600k_tiny:")
    a = FaceAnalyzer(encoder=enc)(astronaut_path)
    x = (a.aligned.astype(np.float32) - 127.5) / 127.5
    ref = x.transpose(2, 0, 1).reshape(1, -1) @ w  # same graph in NumPy
    np.testing.assert_allclose(a.embedding, ref[0] / np.linalg.norm(ref), atol=1e-4)


def test_onnx_scaling_guess_without_onnx_warns(tmp_path, monkeypatch, caplog):
    tiny_onnx(tmp_path / "w600k_tiny.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        enc = OnnxFaceEncoder(tmp_path / "w600k_tiny.onnx")
    assert (enc.mean, enc.std) == (127.5, 127.5)
    assert "w600k_tiny.onnx" in caplog.text and "onnx package is not installed" in caplog.text
    assert "(x - 127.5) / 127.5" in caplog.text


def test_onnx_scaling_guess_on_an_unreadable_graph_warns(tmp_path, monkeypatch, caplog):
    import onnx
    from google.protobuf.message import DecodeError

    tiny_onnx(tmp_path / "w600k_tiny.onnx")

    def unreadable(*args, **kwargs):
        raise DecodeError("Error parsing message")

    monkeypatch.setattr(onnx, "load", unreadable)
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        enc = OnnxFaceEncoder(tmp_path / "w600k_tiny.onnx")
    assert (enc.mean, enc.std) == (127.5, 127.5)
    assert "cannot read the graph (DecodeError)" in caplog.text and "127.5" in caplog.text


def test_onnx_graph_that_normalises_itself_gets_raw_pixels(tmp_path, caplog):
    tiny_onnx(tmp_path / "self_norm.onnx", normalise=True)
    with caplog.at_level(logging.WARNING, logger="celebbasis"):
        enc = OnnxFaceEncoder(tmp_path / "self_norm.onnx")
    assert (enc.mean, enc.std) == (0.0, 1.0) and not caplog.text


def test_onnx_channels_last_model_is_refused_at_load(tmp_path):
    path = tmp_path / "nhwc.onnx"
    tiny_onnx(path, input_shape=(1, 112, 112, 3))
    with pytest.raises(InputError, match=r"not \(N, 3, H, W\) RGB faces") as e:
        OnnxFaceEncoder(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_onnx_runtime_errors_name_the_model(tmp_path, astronaut_path):
    from onnx import TensorProto

    class OneFace:  # where MTCNN would put the face, without running it
        def detect(self, image):
            return [Face((100.0, 100.0, 400.0, 400.0), ARCFACE_TEMPLATE * 2.5 + 110, 1.0, FIVE_POINT)]

    path = tmp_path / "half.onnx"
    tiny_onnx(path, input_type=TensorProto.FLOAT16)  # onnxruntime refuses the float32 input at run time
    analyzer = FaceAnalyzer(detector=OneFace(), encoder=OnnxFaceEncoder(path))
    with pytest.raises(InputError, match="fails on a 112x112 RGB face") as e:
        analyzer(astronaut_path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_face_encoder_spec_errors(tmp_path):
    from celebbasis.face import make_face_encoder

    with pytest.raises(InputError, match="Unknown face encoder"):
        make_face_encoder("facenet")
    with pytest.raises(InputError, match="no such file"):
        make_face_encoder(f"onnx:{tmp_path}/missing.onnx")


def test_add_with_arcface_records_the_encoder(tmp_path, tiny_model_dir, astronaut_path):
    from celebbasis.cli import main
    from celebbasis.identity import Identity

    torch.manual_seed(0)
    torch.save(IResNet(IRESNET_LAYERS["r18"]).state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "ids"
    assert main(["add", str(astronaut_path), "--name", "alice", "--model", str(tiny_model_dir), "-o", str(out),
                 "--face-encoder", f"arcface:{tmp_path / 'backbone.pth'}", "--steps", "2", "--resolution", "64", "-q"]) == 0
    ident = Identity.load(out / "alice.safetensors")
    assert ident.metadata["face_encoder"].startswith("arcface-r18:")


def test_a_face_network_added_from_outside_trains_and_is_recorded(tiny_pipe, astronaut_path):
    """The face-network extension point: one class and one registration, no change to the package."""
    import celebbasis as cb
    from celebbasis.face import DLIB5, FACE_ENCODERS, make_face_encoder, register_face_encoder

    class MeanColour:  # a stand-in network: the aligned crop's mean colour per quadrant, 12 numbers
        name, embedding_dim, landmarks = "mean-colour", 12, DLIB5

        def align(self, image, face):
            return np.asarray(Image.fromarray(image).resize((64, 64)))

        def embed(self, aligned):
            q = aligned.reshape(2, 32, 2, 32, 3).mean((1, 3)).ravel().astype(np.float32)
            return q / np.linalg.norm(q)

    register_face_encoder("mean-colour", MeanColour)
    try:
        analyzer = cb.FaceAnalyzer(encoder="mean-colour")
        result = cb.personalize(tiny_pipe, [astronaut_path], ["alice"], face_analyzer=analyzer, show_progress=False,
                                config=cb.TrainConfig(steps=2, resolution=64, views=2))
        assert result.identities[0].metadata["face_encoder"] == "mean-colour"
        with pytest.raises(InputError, match="mean-colour"):  # listed among the kinds
            make_face_encoder("nothing")
    finally:
        del FACE_ENCODERS["mean-colour"]


def test_a_plug_ins_face_encoder_is_found_before_any_other_use_of_the_library():
    """``celebbasis pretrain --toy`` asks for the toy face network before it loads the toy world: the
    command line registers the plug-ins first (a fresh process, where nothing has touched the package yet)."""
    import subprocess

    code = ("import argparse; from celebbasis import cli; "
            "print(type(cli._analyzer(argparse.Namespace(toy=True)).encoder).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ToyFaceEncoder", out.stderr[-2000:]
