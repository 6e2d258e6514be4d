"""Detector graphs lowbit did not export, of two other families, built here with random weights and exported with
batch norm folded (weights renamed `onnx::Conv_N`): an anchor-free head with objectness and grid-relative boxes
(YOLOX's layout, BGR 0-255 input), a dense head with separate box and score outputs and NMS left outside (the
layout of RetinaNet / SSD exports that stop before post-processing), and torchvision's SSDlite with NMS inside."""

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.errors import LowbitError

runner = CliRunner()
SIZE = 128


def _block(cin: int, cout: int, stride: int, act=torch.nn.SiLU) -> torch.nn.Sequential:
    """conv + batch norm + activation: the batch norm is what an export folds into an unnamed weight."""
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(cout), act())


def _random_bn_statistics(net: torch.nn.Module) -> None:
    """BN statistics away from identity, so folding them changes the weights."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


class _AnchorFree(torch.nn.Module):
    """Backbone of strided conv+BN+SiLU blocks; per stride 8/16/32 a head of [4 box offsets, objectness, 80 classes]
    with sigmoids on the scores, flattened to [B, anchors, 85] as YOLOX exports it (decoding left outside)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(_block(3, 16, 2), _block(16, 24, 2), _block(24, 32, 2))
        self.down = torch.nn.ModuleList([_block(32, 32, 1), _block(32, 48, 2), _block(48, 64, 2)])
        self.heads = torch.nn.ModuleList([torch.nn.Conv2d(c, 85, 1) for c in (32, 48, 64)])

    def forward(self, x):
        x = self.stem(x / 255.0)
        outs = []
        for down, head in zip(self.down, self.heads):
            x = down(x)
            y = head(x)
            y = torch.cat([y[:, :4], y[:, 4:].sigmoid()], 1)
            outs.append(y.flatten(2))
        return torch.cat(outs, 2).permute(0, 2, 1)


@pytest.fixture(scope="module")
def anchor_free(tmp_path_factory):
    torch.manual_seed(0)
    net = _AnchorFree().eval()
    _random_bn_statistics(net)
    with torch.no_grad():
        for h in net.heads:  # confident enough that detections survive the 0.01 threshold
            h.bias[4:] = 2.0
    path = tmp_path_factory.mktemp("af") / "af.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, SIZE, SIZE), str(path), opset_version=13, dynamo=False,
                      input_names=["images"], output_names=["output"], do_constant_folding=True,
                      training=torch.onnx.TrainingMode.EVAL)
    return net, path


def _every_onnx_verb(path, tmp_path, preprocess: str, convs: int, assets) -> None:
    """sensitivity --method onnx, quantize-onnx W8A8 and bench on a graph, each fed as `preprocess` says."""
    common = ["--preprocess", preprocess, "--calib", assets["calib"]]
    r = runner.invoke(app, ["sensitivity", "-m", str(path), "--method", "onnx", "-f", "W8A8", "--calib-images", "2",
                            "-o", str(tmp_path / "s"), *common])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "s" / "onnx" / "layer-sensitivity-report.json").read_text())
    assert len(report["rows"]) == convs and all(row["scores"]["W8A8"] > 0 for row in report["rows"])
    r = runner.invoke(app, ["quantize-onnx", str(path), "-f", "W8A8", "--calib-images", "4", "--onnx",
                            str(tmp_path / "q.onnx"), "-o", str(tmp_path / "q"), *common])
    assert r.exit_code == 0 and f"{convs} convs" in r.output, r.output
    r = runner.invoke(app, ["bench", str(path), str(tmp_path / "q.onnx"), "--reps", "2", "--threads", "1",
                            "--verify-images", "2", "--preprocess", preprocess, "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    ov = [x for x in rows if x["model"] == str(tmp_path / "q.onnx") and x["runtime"] == "openvino-cpu"]
    assert ov and ov[0]["median_ms"] > 0 and ov[0]["parity"]["relative_error"] is not None


def _reference_yolox(out: torch.Tensor, size: int) -> list[torch.Tensor]:
    """YOLOX's published evaluation post-processing, written out independently: decode_outputs, then postprocess
    with confidence 0.01 and class-aware NMS at 0.65."""
    from torchvision.ops import batched_nms

    grids, strides = [], []
    for s in (8, 16, 32):
        n = size // s
        yv, xv = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        grids.append(torch.stack((xv, yv), 2).view(1, -1, 2))
        strides.append(torch.full((1, n * n, 1), s))
    out = out.clone()
    out[..., :2] = (out[..., :2] + torch.cat(grids, 1)) * torch.cat(strides, 1)
    out[..., 2:4] = torch.exp(out[..., 2:4]) * torch.cat(strides, 1)
    res = []
    for p in out:
        xyxy = torch.cat([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1)
        conf, cls = p[:, 5:].max(1)
        keep = p[:, 4] * conf >= 0.01
        score = (p[:, 4] * conf)[keep]
        idx = batched_nms(xyxy[keep], score, cls[keep], 0.65)
        res.append(torch.cat([xyxy[keep][idx], score[idx, None], cls[keep][idx, None].float()], 1))
    return res


def test_anchor_free_graph_decodes_as_its_framework_and_runs_every_verb(tmp_path, anchor_free, assets):
    from lowbit.evaluate.runners import make_runner
    from lowbit.models.onnx_detector import ModelCard, decode, load_card
    from lowbit.quantize.qdq import conv_layers, load_graph

    net, path = anchor_free
    names = [i.name for i in onnx.load(str(path)).graph.initializer]
    # the six convs with batch norm were folded and renamed (onnx::Conv_N): found by structure, not by name
    assert sum(n.startswith("onnx::Conv") for n in names) >= 6
    assert len(conv_layers(load_graph(path))) == 9
    # the decoder is read off the output shape; it keeps exactly what YOLOX's own post-processing keeps
    x = torch.rand(2, 3, SIZE, SIZE) * 255
    out = make_runner(path)(x)
    ours = decode(out, ModelCard(), 80, SIZE)
    ref = _reference_yolox(net(x).detach(), SIZE)
    assert sum(len(r) for r in ref) > 10
    def rows(p):  # in a fixed order: ONNX Runtime and PyTorch may list equal scores either way round
        r = np.round(p.numpy().astype(np.float64), 2)
        return r[np.lexsort(r.T[::-1])]

    for a, b in zip(ours, ref):
        assert a.shape == b.shape and np.allclose(rows(a), rows(b), atol=0.011)
    # preprocessing comes from a card beside the graph, or the command line
    (tmp_path / "af.lowbit.yaml").write_text("preprocess: yolox\nclasses: coco80\n")
    card = load_card(tmp_path / "af.onnx")
    assert card.preprocess.color == "bgr" and card.preprocess.scale == 1.0 and card.preprocess.resize == "letterbox-corner"
    with pytest.raises(LowbitError, match="unknown preprocessing 'yolo'"):
        load_card(path, preprocess="yolo")

    r = runner.invoke(app, ["eval", "-m", str(path), "-d", assets["val"], "--max-images", "4", "--preprocess", "yolox",
                            "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e" / "results.json").read_text())["imgsz"] == SIZE  # the graph's own size
    r = runner.invoke(app, ["layers", "-m", str(path)])
    assert r.exit_code == 0 and "9 quantizable" in r.output, r.output
    _every_onnx_verb(path, tmp_path, "yolox", 9, assets)


def test_torchvision_ssdlite_with_nms_inside(tmp_path, assets):
    import torchvision

    from lowbit.data.datasets import load_dataset
    from lowbit.data.loader import make_batches, parse_preprocess
    from lowbit.evaluate.runners import make_runner
    from lowbit.models.onnx_detector import decode, load_card

    torch.manual_seed(0)
    net = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=91).eval()
    path = tmp_path / "ssd.onnx"
    torch.onnx.export(net, ([torch.rand(3, 320, 320)],), str(path), opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["boxes", "scores", "labels"], do_constant_folding=True)
    card = load_card(path, preprocess="torchvision")
    pre = parse_preprocess("torchvision")
    batch = make_batches(load_dataset(assets["val"]).subset(2), 320, 2, preprocess=pre)[0]
    outs = make_runner(path).chunks(batch.images)  # a graph without a batch axis runs image by image
    assert len(outs) == 2 and all(isinstance(o, tuple) and len(o) == 3 for o in outs)
    for o, item in zip(outs, batch.items):
        (pred,) = decode(o, card, 91, 320)  # detected: boxes, float scores and integer labels, no batch axis
        boxes, scores, labels = o
        assert torch.equal(pred[:, :4], boxes) and torch.equal(pred[:, 4], scores) and torch.equal(pred[:, 5], labels.float())
        # stretched to 320x320, so back to the original image per axis
        h, w = item.orig_shape
        back = item.to_original(np.array([[0.0, 0.0, 320.0, 320.0]]))
        assert np.allclose(back, [[0, 0, w, h]])
    r = runner.invoke(app, ["eval", "-m", str(path), "-d", assets["val"], "--max-images", "2", "--preprocess",
                            "torchvision", "--decoder", "nms-inside", "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["quantize-onnx", str(path), "-f", "W8A16", "--preprocess", "torchvision", "--onnx",
                            str(tmp_path / "q.onnx"), "-o", str(tmp_path / "q")])
    # no calibration images: GPTQ has no statistics, so the weights round to nearest, and the run says so
    assert r.exit_code == 0 and "convs" in r.output and "rounded to nearest" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["sensitivity", "-m", str(path), "--method", "onnx", "-f", "W8A8", "--calib-images", "1",
                            "--layers", "head.classification_head.*", "--preprocess", "torchvision", "--calib",
                            assets["calib"], "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "s" / "onnx" / "layer-sensitivity-report.json").read_text())
    # the scored layers keep torchvision's module names
    assert len(report["rows"]) == 12 and all(row["name"].startswith("head.classification_head.") for row in report["rows"])
    # random weights: the deeper levels' activations fade towards zero, and so do their scores
    assert all(row["scores"]["W8A8"] >= 0 for row in report["rows"]) and report["rows"][0]["scores"]["W8A8"] > 0
    r = runner.invoke(app, ["bench", str(path), str(tmp_path / "q.onnx"), "--reps", "2", "--threads", "1",
                            "--verify-images", "2", "--preprocess", "torchvision", "--decoder", "nms-inside",
                            "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output


class _BoxesScores(torch.nn.Module):
    """Conv+BN+ReLU backbone; per stride 8/16 a box branch (offsets from each cell's centre, in pixels) and a class
    branch (sigmoid scores): outputs boxes [B, N, 4] as x1 y1 x2 y2 pixels and scores [B, N, 80]."""

    def __init__(self):
        super().__init__()
        relu = torch.nn.ReLU
        self.stem = torch.nn.Sequential(_block(3, 16, 2, relu), _block(16, 32, 2, relu), _block(32, 32, 2, relu))
        self.down = _block(32, 48, 2, relu)
        self.box = torch.nn.ModuleList([torch.nn.Conv2d(c, 4, 3, 1, 1) for c in (32, 48)])
        self.cls = torch.nn.ModuleList([torch.nn.Conv2d(c, 80, 3, 1, 1) for c in (32, 48)])

    def forward(self, x):
        f8 = self.stem(x)
        boxes, scores = [], []
        for f, stride, box, cls in zip((f8, self.down(f8)), (8, 16), self.box, self.cls):
            n = f.shape[-1]
            ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            centre = (torch.stack((xs, ys, xs, ys)).float() + 0.5) * stride  # [4, n, n]
            sign = torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 4, 1, 1)
            b = centre + sign * torch.nn.functional.softplus(box(f)) * stride
            boxes.append(b.flatten(2))
            scores.append(cls(f).sigmoid().flatten(2))
        return torch.cat(boxes, 2).permute(0, 2, 1), torch.cat(scores, 2).permute(0, 2, 1)


def _reference_boxes_scores(boxes: torch.Tensor, scores: torch.Tensor) -> list[torch.Tensor]:
    """torchvision's detection post-processing written out per class: candidates over 0.001, NMS at IoU 0.5 within
    each class, the 100 best over all classes."""
    from torchvision.ops import nms

    res = []
    for bx, sc in zip(boxes, scores):
        kept = []
        for c in range(sc.shape[1]):
            m = sc[:, c] > 0.001
            keep = nms(bx[m], sc[m, c], 0.5)
            kept.append(torch.cat([bx[m][keep], sc[m, c][keep, None], torch.full((len(keep), 1), float(c))], 1))
        allk = torch.cat(kept)
        res.append(allk[allk[:, 4].argsort(descending=True)[:100]])
    return res


def test_boxes_and_scores_graph_decodes_as_torchvision_and_runs_every_verb(tmp_path, assets):
    from lowbit.evaluate.runners import make_runner
    from lowbit.models.onnx_detector import ModelCard, decode, detect_decoder
    from lowbit.quantize.qdq import conv_layers, load_graph

    torch.manual_seed(0)
    net = _BoxesScores().eval()
    _random_bn_statistics(net)
    path = tmp_path / "bs.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, SIZE, SIZE), str(path), opset_version=13, dynamo=False,
                      input_names=["images"], output_names=["boxes", "scores"], do_constant_folding=True,
                      training=torch.onnx.TrainingMode.EVAL)
    assert len(conv_layers(load_graph(path))) == 8
    x = torch.rand(2, 3, SIZE, SIZE)
    outs = make_runner(path).chunks(x)  # the static batch-1 graph runs image by image
    assert detect_decoder(list(outs[0]), 80, SIZE) == "boxes-scores"
    ours = [p for o in outs for p in decode(o, ModelCard(), 80, SIZE)]
    with torch.no_grad():
        ref = _reference_boxes_scores(*net(x))
    for a, b in zip(ours, ref):
        assert len(a) == len(b) == 100
        # the same detections: each of ours has a reference twin of the same class, score and box
        a, b = a.numpy(), b.numpy()
        for row in a:
            twin = b[(b[:, 5] == row[5]) & (np.abs(b[:, 4] - row[4]) < 1e-4)]
            assert len(twin) and np.abs(twin[:, :4] - row[:4]).max(1).min() < 0.05, row

    r = runner.invoke(app, ["eval", "-m", str(path), "-d", assets["val"], "--max-images", "2", "--preprocess",
                            "torchvision", "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    _every_onnx_verb(path, tmp_path, "torchvision", 8, assets)


def test_an_unknown_head_is_a_clear_error(tmp_path):
    from lowbit.models.onnx_detector import ModelCard, decode

    with pytest.raises(LowbitError, match=r"cannot decode model outputs of shapes \[\(1, 7, 3\)\]"):
        decode(torch.zeros(1, 7, 3), ModelCard(), 80, 64)


class _Gfl(torch.nn.Module):
    """PP-PicoDet's deploy layout (a GFL head): per stride 8/16/32/64, sigmoid class scores [B, N, 80], then per
    stride box distributions [B, N, 32] (4 sides x 8 bins, reg_max 7)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(_block(3, 16, 2), _block(16, 24, 2), _block(24, 32, 2))
        self.down = torch.nn.ModuleList([_block(32, 32, s) for s in (1, 2, 2, 2)])
        self.heads = torch.nn.ModuleList([torch.nn.Conv2d(32, 80 + 32, 1) for _ in range(4)])

    def levels(self, x):
        x = self.stem(x)
        scores, dists = [], []
        for down, head in zip(self.down, self.heads):
            x = down(x)
            y = head(x)
            scores.append(y[:, :80].sigmoid().flatten(2).permute(0, 2, 1))
            dists.append(y[:, 80:].flatten(2).permute(0, 2, 1))
        return scores, dists

    def forward(self, x):
        scores, dists = self.levels(x)
        return (*scores, *dists)


class _GflRows(_Gfl):
    """The same head with post-processing inside, as PaddleDetection exports it: inputs image and scale_factor
    ([h_in / h_img, w_in / w_img]), outputs rows of [class, score, x1, y1, x2, y2] in the image's own pixels (the
    20 best anchors; NMS left out, which changes nothing of the layout) and their count."""

    def forward(self, x, scale_factor):
        scores, dists = self.levels(x)
        boxes = []
        for d, s in zip(dists, (8, 16, 32, 64)):
            n = SIZE // s
            yv, xv = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            pts = (torch.stack((xv, yv), -1).reshape(-1, 2).float() + 0.5) * s
            dist = (d.reshape(1, -1, 4, 8).softmax(-1) @ torch.arange(8).float()) * s
            boxes.append(torch.cat([pts - dist[..., :2], pts + dist[..., 2:]], -1))
        score, cls = torch.cat(scores, 1)[0].max(-1)
        top, idx = score.topk(20)
        box = torch.cat(boxes, 1)[0][idx] / scale_factor.flip(-1).repeat(1, 2)
        rows = torch.cat([cls[idx, None].float(), top[:, None], box], 1)
        return rows, torch.tensor([20], dtype=torch.int32)


def _reference_gfl(outs: list[np.ndarray]) -> list[np.ndarray]:
    """PaddleDetection's GFL post-processing written out independently (as benchmarks/onnx_detector_reference.py
    does for PP-PicoDet): expectation of the softmax over the bins times the stride from cell centres, per class
    scores over 0.025, the 1000 best, NMS at 0.6, the 100 best."""
    from torchvision.ops import nms

    levels = len(outs) // 2
    boxes, scores = [], []
    for i, (cls, reg) in enumerate(zip(outs[:levels], outs[levels:])):
        s = 8 * 2 ** i
        n = SIZE // s
        cy, cx = np.meshgrid((np.arange(n) + 0.5) * s, (np.arange(n) + 0.5) * s, indexing="ij")
        p = np.exp(reg[0].reshape(-1, 4, 8))
        d = (p / p.sum(-1, keepdims=True)) @ np.arange(8) * s
        cx, cy = cx.reshape(-1), cy.reshape(-1)
        boxes.append(np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], 1))
        scores.append(cls[0])
    b, sc = torch.from_numpy(np.concatenate(boxes)).float(), torch.from_numpy(np.concatenate(scores))
    kept = []
    for c in range(sc.shape[1]):
        idx = torch.nonzero(sc[:, c] > 0.025).flatten()
        idx = idx[sc[idx, c].argsort(descending=True)[:1000]]
        keep = idx[nms(b[idx], sc[idx, c], 0.6)]
        kept.append(torch.cat([b[keep], sc[keep, c, None], torch.full((len(keep), 1), float(c))], 1))
    allk = torch.cat(kept)
    return [allk[allk[:, 4].argsort(descending=True)[:100]].numpy()]


def test_gfl_head_and_paddle_exports_with_scale_factor_and_nms_rows(tmp_path, assets):
    """A GFL head (PP-PicoDet, NanoDet) decodes as PaddleDetection does; its NMS-inside export, fed a scale_factor
    beside the image and returning [class, score, box] rows in image pixels, is read as the card describes, and an
    input no card describes is refused by name."""
    from lowbit.data.datasets import load_dataset
    from lowbit.data.loader import make_batches, parse_preprocess
    from lowbit.evaluate.runners import make_runner
    from lowbit.models.onnx_detector import ModelCard, decode, detect_decoder, to_input_pixels

    torch.manual_seed(0)
    net = _GflRows().eval()
    _random_bn_statistics(net)
    with torch.no_grad():
        for h in net.heads:  # scores above PaddleDetection's 0.025
            h.bias[:80] = -1.0
    gfl, rows = tmp_path / "gfl.onnx", tmp_path / "rows.onnx"
    x = torch.zeros(1, 3, SIZE, SIZE)
    plain = _Gfl()
    plain.load_state_dict(net.state_dict())  # the same weights, without the post-processing
    torch.onnx.export(plain.eval(), x, str(gfl), opset_version=13, dynamo=False, input_names=["image"],
                      do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    torch.onnx.export(net, (x, torch.ones(1, 2)), str(rows), opset_version=13, dynamo=False,
                      input_names=["image", "scale_factor"], output_names=["rows", "count"], do_constant_folding=True,
                      training=torch.onnx.TrainingMode.EVAL)
    # the GFL layout is read off the shapes; detections are PaddleDetection's
    img = torch.rand(1, 3, SIZE, SIZE)
    outs = make_runner(gfl)(img)
    assert detect_decoder(list(outs), 80, SIZE) == "gfl"
    (ours,) = decode(outs, ModelCard(), 80, SIZE)
    (ref,) = _reference_gfl([o.numpy() for o in outs])
    assert len(ours) == len(ref) > 10
    assert np.allclose(np.sort(ours[:, 4].numpy()), np.sort(ref[:, 4]), atol=1e-5)
    assert np.abs(ours[:, :4].numpy()[:, None] - ref[None, :, :4]).max(-1).min(1).max() < 0.01
    with pytest.raises(LowbitError, match=r"decoder 'gfl' does not fit .*card keys strides, reg_max, cell_offset"):
        decode(outs, ModelCard(decoder="gfl", strides=[8, 16, 32, 128]), 80, SIZE)

    # NMS inside, scale_factor beside the image: refused until the card says what to feed it
    r = runner.invoke(app, ["eval", "-m", str(rows), "-d", assets["val"], "--max-images", "2", "--preprocess",
                            "paddle", "-o", str(tmp_path / "e0")])
    err = str(r.exception)  # main() turns it into "Error: ..." and exit 2
    assert isinstance(r.exception, LowbitError) and "input 'scale_factor' [1, 2] is not described" in err, err
    assert "`inputs: {scale_factor: scale_factor}`" in err
    card = ModelCard(preprocess=parse_preprocess("paddle"), decoder="nms-rows", boxes="original",
                     inputs={"scale_factor": "scale_factor"})
    batch = make_batches(load_dataset(assets["val"]).subset(2), SIZE, 1, preprocess=card.preprocess)
    r_rows = make_runner(rows)
    r_rows.card = card
    for b in batch:
        (it,) = b.items
        assert it.gain[0] != it.gain[1]  # stretched: the two axes differ, so [h, w] order matters
        got = to_input_pixels([p for o in r_rows.chunks(b.images, b.items) for p in decode(o, card, 80, SIZE)],
                              b.items)[0]
        r_rows.card = card.model_copy(update={"inputs": {"scale_factor": [1.0, 1.0]}, "boxes": "pixels"})
        plain = [p for o in r_rows.chunks(b.images) for p in decode(o, r_rows.card, 80, SIZE)][0]
        r_rows.card = card
        assert len(got) == 20 and torch.allclose(got, plain, atol=1e-3)
    (tmp_path / "rows.lowbit.yaml").write_text("preprocess: paddle\ndecoder: nms-rows\nboxes: original\n"
                                               "inputs: {scale_factor: scale_factor}\n")
    r = runner.invoke(app, ["eval", "-m", str(rows), "-d", assets["val"], "--max-images", "2", "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    # graph-only PTQ feeds the scale_factor while calibrating; the card goes beside the quantized graph
    r = runner.invoke(app, ["quantize-onnx", str(rows), "-f", "W8A8", "--calib", assets["calib"], "--calib-images",
                            "2", "--onnx", str(tmp_path / "q.onnx"), "-o", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q.lowbit.yaml").is_file()
    r = runner.invoke(app, ["eval", "-m", str(tmp_path / "q.onnx"), "-d", assets["val"], "--max-images", "2",
                            "-o", str(tmp_path / "eq")])
    assert r.exit_code == 0, r.output
    (tmp_path / "rows.lowbit.yaml").unlink()
    r = runner.invoke(app, ["quantize-onnx", str(rows), "-f", "W8A8", "--calib", assets["calib"], "--calib-images",
                            "2", "--onnx", str(tmp_path / "q2.onnx"), "-o", str(tmp_path / "q2")])
    assert isinstance(r.exception, LowbitError) and "input 'scale_factor'" in str(r.exception), r.output
    assert not (tmp_path / "q2.onnx").exists()
