"""Train the demo model on the shapes world, in LLaVA's two stages, resumable from its checkpoints.

Stage 1 (vision): the CLIP tower alone learns per-patch colour / shape / object-centre / grid labels from
the generator's masks. Stage 2 (language): with the tower frozen, the projector and the language model learn
the questions; all questions about one image are packed in one sequence after a single copy of the image,
each question masked to see only the image and itself (and positioned as if it were alone), so the 576
vision tokens are paid once for many answers. A curriculum goes from one or two objects and three question
families to the full world. Learning rate and curriculum follow the fraction of the step budget or of the
time budget already used, whichever is larger, so a run can be given a wall-clock budget.

A model from scratch on the 2-core CPU (as an earlier model was made: stage 1 about 5 min, stage 2 115 min of
its own time budget):

    python -m vlm.shapes.train --out checkpoints --threads 2 --stage1-steps 1200 --stage1-batch 8 \
        --stage2-steps 100000 --stage2-minutes 115 --eval-every 300

On a GPU, add `--device cuda --workers N` (N processes render and pack batches ahead; the model's step is far
cheaper than making its batch on one core) and larger batches. The shipped model (vlm/assets/shapes_llava) was
trained so on an H100 in 12 minutes; its three commands are in benchmarks/results/shapes_demo_eval.md.

Run it in the background (nohup ... > checkpoints/train.log &); rerunning the same command resumes from the
last checkpoint. Set --threads to the free cores: oversubscribed threads made steps up to 9x slower here.

`--init-model DIR` fine-tunes a trained model (stage 2 only). For that, the "relations" curriculum, the
training-only "position" questions, the projector's position read-out (`--stage2-position-weight`) and the
answer positions' read-out of the named objects' centres (`--stage2-locate-weight`) teach relative position;
benchmarks/results/shapes_training_trials.md tells which runs used them and what they gave.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from vlm.models import ModelConfigError, resolve_device
from vlm.shapes.model_config import build_demo_model
from vlm.shapes.processor import CLIP_MEAN, CLIP_STD, IMAGE_PREFIX, build_processor
from vlm.shapes.world import (COLORS, FAMILIES, GRID, IMAGE_SIZE, SHAPES, Scene, WorldOptions, make_scene,
                              patch_coverage, patch_labels, render_scene, split_seeds)

NEG = torch.finfo(torch.float32).min
OBJECT_ONLY = ("shape", "center")  # stage-1 labels whose loss is taken on object patches only


def rendered_batch(scenes: list[Scene]) -> torch.Tensor:
    """Rendered scenes as uint8 [B, 3, 336, 336] (a quarter of the bytes of `pixel_batch`, for moving batches)."""
    return torch.from_numpy(np.stack([np.asarray(render_scene(s), dtype=np.uint8) for s in scenes])).permute(0, 3, 1, 2)


def normalised_pixels(rendered: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> CLIP-normalised float32 on the same device (the numbers the processor gives)."""
    mean = torch.tensor(CLIP_MEAN, device=rendered.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=rendered.device)[:, None, None]
    return (rendered.float() / 255.0 - mean) / std


def pixel_batch(scenes: list[Scene]) -> torch.Tensor:
    """CLIP-normalised pixels of rendered scenes: [B, 3, 336, 336] (same numbers as the processor gives)."""
    return normalised_pixels(rendered_batch(scenes))


def train_seed(base_seed: int, step: int, i: int) -> int:
    """The scene seed of image `i` at `step`: deterministic, inside the train split's range."""
    lo, hi = split_seeds("train")
    return lo + int(np.random.default_rng([base_seed, step, i]).integers(0, hi - lo))


def curriculum(progress: float, rng: np.random.Generator) -> WorldOptions:
    """World options for one training image at `progress` in [0, 1]: small worlds first, then the full one."""
    # many questions per image: the 576 vision tokens cost far more than a dozen question tokens
    easy = WorldOptions(min_objects=1, max_objects=2, min_palette=1, max_palette=2,
                        families=("color", "shape", "exist"), questions_per_family=5)
    mid = WorldOptions(min_objects=1, max_objects=4, min_palette=1, max_palette=3, questions_per_family=4)
    full = WorldOptions(questions_per_family=4)
    if progress < 0.12:
        return easy
    if progress < 0.35:
        return mid if rng.random() < 0.8 else easy
    return full if rng.random() < 0.85 else mid


def relation_curriculum(progress: float, rng: np.random.Generator) -> WorldOptions:
    """World options for fine-tuning a trained model on relative position: half the images are the full
    world (all families, so the others are not forgotten), half ask position questions only: where one named
    object is (the training-only "position" family) and which side of another it lies on ("relative"), on
    scenes of two or three objects until 30% of the run, then of up to six."""
    if rng.random() < 0.5:
        return WorldOptions(questions_per_family=4)
    return WorldOptions(min_objects=2, max_objects=3 if progress < 0.3 else 6, min_palette=2, max_palette=4,
                        families=("position", "relative"), questions_per_family=5)


CURRICULA = {"shipped": curriculum, "relations": relation_curriculum}


# ----------------------------------------------------------------------------------------------- stage 1
class PatchHeads(nn.Module):
    """Linear read-outs of per-patch labels from the vision tower's selected layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.color = nn.Linear(width, len(COLORS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.center = nn.Linear(width, 2)
        self.row = nn.Linear(width, GRID)
        self.col = nn.Linear(width, GRID)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """feats [B, 576, D] -> logits per label name, each [B, 576, C]."""
        return {k: getattr(self, k)(feats) for k in ("color", "shape", "center", "row", "col")}


PATCH_LOSS_WEIGHTS = {"color": 1.0, "shape": 2.0, "center": 1.0, "row": 0.2, "col": 0.2}


class PositionHead(nn.Module):
    """Linear read-out of each vision token's (x, y) in [-1, 1] from the projector's output (the language
    model's input embeddings). Trained alongside stage 2 it makes the projector expose position as linear
    directions, which the language model needs to compare two objects' positions: the frozen tower has
    position only as 24-way row / column classes (a linear scalar read-out of the column explains 36% of its
    variance on the shipped tower, 0% after its projector)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.xy = nn.Linear(width, 2)
        # small random weights: a zero-initialised read-out sends no gradient into the features, and where they
        # hold no linear position (the shipped tower's object patches) it then never finds a direction either
        nn.init.normal_(self.xy.weight, std=0.05)
        nn.init.zeros_(self.xy.bias)
        idx = torch.arange(GRID * GRID)
        grid = torch.stack([idx % GRID, idx // GRID], dim=-1).float()
        self.register_buffer("target", grid / (GRID - 1) * 2 - 1, persistent=False)  # [576, 2]

    def loss(self, embeds: torch.Tensor, on: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, 576, D] -> mean squared error of the (x, y) read-out, over the patches where `on`
        [B, 576] is True (all when None). Training takes it on object patches, where the language model reads
        an object's position: taken over all patches, the background (most of them) dominated, and after
        14 min of fine-tuning the error over all patches was 0.035 while a linear read-out of the column on
        object patches explained only 31% of its variance."""
        normed = nn.functional.layer_norm(embeds, embeds.shape[-1:])  # the projector's output scale is arbitrary
        err = (self.xy(normed) - self.target).pow(2).mean(-1)  # [B, 576]
        if on is None:
            return err.mean()
        return (err * on).sum() / on.sum().clamp_min(1)


class LocateHead(nn.Module):
    """Linear read-out, at a question's answer position and a middle layer of the language model, of the
    centres of the objects the question names: (x, y) of the first and of the second, in [-1, 1].

    A relative-position answer needs both objects' positions gathered at the answer position, and a model
    at chance on those questions sends almost no gradient toward gathering them; this loss asks for them
    directly, on every question that names one or two objects. Like the stage-1 heads it only shapes
    training: it is not part of the saved model."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.xy = nn.Linear(width, 4)
        nn.init.normal_(self.xy.weight, std=0.05)
        nn.init.zeros_(self.xy.bias)

    def loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] at answer positions, target [N, 4] with NaN where there is nothing to read
        -> mean squared error over the known coordinates (0 when there are none)."""
        known = ~torch.isnan(target)
        if not known.any():
            return hidden.sum() * 0.0
        pred = self.xy(nn.functional.layer_norm(hidden, hidden.shape[-1:]))
        return (pred - target.nan_to_num()).pow(2)[known].mean()


def patch_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Per-patch labels of the scenes, each [B, 576]."""
    labels = [patch_labels(s) for s in scenes]
    return {k: torch.from_numpy(np.stack([lab[k] for lab in labels])) for k in PATCH_LOSS_WEIGHTS}


def patch_loss(logits: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted per-patch cross-entropy; shape and centre on object patches only (the background would dominate)."""
    obj = (target["color"] > 0).flatten()
    total = torch.zeros((), device=obj.device)
    for k, w in PATCH_LOSS_WEIGHTS.items():
        lg, tg = logits[k].flatten(0, 1), target[k].flatten()
        if k in OBJECT_ONLY:
            lg, tg = lg[obj], tg[obj]
        total = total + w * nn.functional.cross_entropy(lg, tg)
    return total


def vision_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch features the projector receives: pixels [B, 3, 336, 336] -> [B, 576, D_vision] (CLS dropped)."""
    layer = model.config.vision_feature_layer
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


def stage1_batch(seed: int, step: int, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rendered images (uint8 [B, 3, 336, 336]) and per-patch labels of stage 1's `step` (deterministic)."""
    rng = np.random.default_rng([seed, 1, step])
    scenes = [make_scene(train_seed(seed + 1, step, i),
                         WorldOptions(min_objects=int(rng.integers(2, 5)), max_objects=6, min_palette=1,
                                      max_palette=6)) for i in range(batch)]
    return rendered_batch(scenes), patch_targets(scenes)


_WORKER_PACKER: "Packer | None" = None


def _worker_init() -> None:
    torch.set_num_threads(1)


def stage2_worker_batch(seed: int, step: int, progress: float, batch: int, schedule: str,
                        want_targets: bool) -> tuple["PackedBatch", dict[str, torch.Tensor] | None]:
    """`stage2_batch` in a worker process, with its own packer and the mask left to the training device."""
    global _WORKER_PACKER
    if _WORKER_PACKER is None:
        _WORKER_PACKER = Packer(build_processor())
    return stage2_batch(_WORKER_PACKER, seed, step, progress, batch, schedule, want_targets, for_transfer=True)


class Prefetcher:
    """Makes the batches of the coming steps ahead of use: `get(step, args_of)` returns `fn(*args_of(step))` and
    keeps `depth` later steps in flight in `workers` spawned processes, so that rendering and packing on the CPU
    keep up with a GPU. With `workers=0` it calls `fn` in this process when asked (no look-ahead)."""

    def __init__(self, fn: Callable[..., Any], workers: int, depth: int | None = None) -> None:
        self.fn = fn
        self.depth = depth or 2 * workers
        self.pending: dict[int, Future] = {}
        self.pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_worker_init) if workers > 0 else None)

    def get(self, step: int, args_of: Callable[[int], tuple]) -> Any:
        if self.pool is None:
            return self.fn(*args_of(step))
        for s in range(step, step + self.depth):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self.fn, *args_of(s))
        for s in [s for s in self.pending if s < step]:  # left over from before a restart of the count
            self.pending.pop(s).cancel()
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def run_stage1(model: nn.Module, out: Path, steps: int, batch: int, seed: int, lr: float, save_every: int = 100,
               log_every: int = 25, workers: int = 0) -> None:
    """Train the vision tower on per-patch labels; resumes from out/stage1.pt; writes the tower when done.
    Runs on the model's device; `workers` processes make the batches ahead (0: made in this process)."""
    ckpt = out / "stage1.pt"
    tower = model.model.vision_tower
    device = model.device
    heads = PatchHeads(model.config.vision_config.hidden_size).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"[stage1] resumed at step {start}", flush=True)
    if start >= steps:
        return
    tower.train()
    t0 = time.time()
    source = Prefetcher(stage1_batch, workers)
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        pixels, target = source.get(step, lambda s: (seed, s, batch))
        pixels, target = normalised_pixels(pixels.to(device)), {k: v.to(device) for k, v in target.items()}
        logits = heads(vision_features(model, pixels))
        loss = patch_loss(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            with torch.no_grad():
                obj = target["color"] > 0
                acc_c = (logits["color"].argmax(-1) == target["color"]).float().mean().item()
                acc_c_obj = (logits["color"].argmax(-1) == target["color"])[obj].float().mean().item()
                acc_s_obj = (logits["shape"].argmax(-1) == target["shape"])[obj].float().mean().item()
                ctr = target["center"] > 0
                rec_ctr = (logits["center"].argmax(-1) == 1)[ctr].float().mean().item()
            print(f"[stage1] step {step + 1}/{steps} loss {loss.item():.4f} color {acc_c:.4f} "
                  f"color@obj {acc_c_obj:.4f} shape@obj {acc_s_obj:.4f} center-recall {rec_ctr:.3f} "
                  f"{(time.time() - t0) / (step + 1 - start):.2f}s/step", flush=True)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            _atomic_save({"tower": tower.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                          "step": step + 1}, ckpt)
    source.close()


# ----------------------------------------------------------------------------------------------- stage 2
@dataclass
class PackedBatch:
    """Packed question sequences, one row per image."""

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, 1, T, T] additive float mask (None: build it from `segments`)
    pixel_values: torch.Tensor  # [B, 3, 336, 336] CLIP-normalised float32 (uint8 as rendered: `to` normalises)
    target_rows: torch.Tensor  # [N] batch index of each supervised position
    target_cols: torch.Tensor  # [N] sequence index of each supervised position
    target_ids: torch.Tensor  # [N] the token to predict there
    is_answer: torch.Tensor  # [N] True where the target is the answer word (False: the closing </s>)
    families: list[str]  # [N] family of each supervised position
    named_mask: torch.Tensor  # [N, 576] True on the patches of the objects the question names
    named_xy: torch.Tensor  # [N, 4] centres (x, y) of the first and second named object in [-1, 1], NaN if none
    image_start: int  # sequence index of the first vision token (the same in every row)
    segments: torch.Tensor  # [B, T] 0 for the shared prefix, k for question k, -1 for padding

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The batch with its tensors on `device`, the attention mask built there if it was left out."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        if self.attention_mask is None:
            moved["attention_mask"] = segment_mask(moved["segments"])
        if self.pixel_values.dtype == torch.uint8:
            moved["pixel_values"] = normalised_pixels(moved["pixel_values"])
        return dataclasses.replace(self, **moved)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Additive attention mask [B, 1, T, T] of packed rows from their segments [B, T]: causal; each question sees
    the shared prefix (segment 0) and itself; padding (-1) is seen by no other position."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    q_seg, k_seg = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0)
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device)  # padding rows see themselves: none is empty
    return torch.zeros(allowed.shape, dtype=torch.float32, device=segments.device).masked_fill(~allowed, NEG)[:, None]


class Packer:
    """Builds packed batches: [BOS USER : <image>*576 \\n] then per question [q ... ASSISTANT : answer </s>]."""

    def __init__(self, processor) -> None:
        self.tok = processor.tokenizer
        n_image = (336 // 14) ** 2
        pre = self.tok(IMAGE_PREFIX)["input_ids"]
        image_id = self.tok.convert_tokens_to_ids("<image>")
        k = pre.index(image_id)
        self.prefix = pre[:k] + [image_id] * n_image + pre[k + 1:]
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str, special: bool = False) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=special)["input_ids"]
        return self._cache[text]

    def answer_id(self, answer: str) -> int:
        """The single token of a one-word answer."""
        ids = self._ids(answer)
        if len(ids) != 1:
            raise ValueError(f"answer {answer!r} is {len(ids)} tokens; answers must be one word of the vocabulary")
        return ids[0]

    def pack(self, scenes: list[Scene], with_eos: bool = True, for_transfer: bool = False) -> PackedBatch:
        """One row per scene holding all its questions; each question sees the image and itself only.

        `for_transfer=True` gives the compact form that worker processes send: no [B, 1, T, T] mask and uint8
        pixels; `PackedBatch.to` completes it on the training device, to the same numbers."""
        rows, poss, segs, targets, named, xy = [], [], [], [], [], []
        p = len(self.prefix)
        for b, scene in enumerate(scenes):
            ids, pos, seg = list(self.prefix), list(range(p)), [0] * p
            cover = patch_coverage(scene).reshape(len(scene.objects), -1) > 0  # [n_objects, 576]
            for qi, q in enumerate(scene.questions):
                body = self._ids(q.text + " ASSISTANT:")
                ans = self.answer_id(q.answer)
                piece = body + [ans] + ([self.eos] if with_eos else [])
                start = len(ids)
                targets.append((b, start + len(body) - 1, ans, True, q.family))
                named.append(cover[list(q.objects)].any(axis=0) if q.objects else np.zeros(GRID * GRID, dtype=bool))
                xy.append(_named_centres(scene, q))
                if with_eos:
                    targets.append((b, start + len(body), self.eos, False, q.family))
                    named.append(np.zeros(GRID * GRID, dtype=bool))
                    xy.append([math.nan] * 4)
                ids += piece
                pos += list(range(p, p + len(piece)))
                seg += [qi + 1] * len(piece)
            rows.append(ids)
            poss.append(pos)
            segs.append(seg)
        t = max(len(r) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, t), self.pad, dtype=torch.long)
        position_ids = torch.zeros((n, t), dtype=torch.long)
        seg_t = torch.full((n, t), -1, dtype=torch.long)
        for b in range(n):
            input_ids[b, :len(rows[b])] = torch.tensor(rows[b])
            position_ids[b, :len(rows[b])] = torch.tensor(poss[b])
            seg_t[b, :len(rows[b])] = torch.tensor(segs[b])
        named_mask = torch.from_numpy(np.stack(named))
        tr = list(zip(*targets))
        return PackedBatch(input_ids, position_ids, None if for_transfer else segment_mask(seg_t),
                           rendered_batch(scenes) if for_transfer else pixel_batch(scenes),
                           torch.tensor(tr[0]), torch.tensor(tr[1]), torch.tensor(tr[2]), torch.tensor(tr[3]),
                           list(tr[4]), named_mask, torch.tensor(xy, dtype=torch.float32),
                           self.prefix.index(self.tok.convert_tokens_to_ids("<image>")), seg_t)


def _named_centres(scene: Scene, q) -> list[float]:
    """Centres (x, y) in [-1, 1] of the first two objects a question names; NaN where it names fewer, and for
    counting questions (their objects are a set, not a first and a second)."""
    out = [math.nan] * 4
    if q.family != "count":
        for k, i in enumerate(q.objects[:2]):
            o = scene.objects[i]
            out[2 * k:2 * k + 2] = [o.cx / IMAGE_SIZE * 2 - 1, o.cy / IMAGE_SIZE * 2 - 1]
    return out


def stage2_batch(packer: "Packer", seed: int, step: int, progress: float, batch: int, schedule: str,
                 want_targets: bool, for_transfer: bool = False
                 ) -> tuple[PackedBatch, dict[str, torch.Tensor] | None]:
    """The packed batch of stage 2's `step` at curriculum `progress` (deterministic given both), with the
    images' per-patch labels when `want_targets`."""
    world = CURRICULA[schedule]
    rng = np.random.default_rng([seed, 2, step])
    scenes = []
    for i in range(batch):
        scene = make_scene(train_seed(seed + 2, step, i), world(progress, rng))
        if scene.questions:
            scenes.append(scene)
    b = packer.pack(scenes, for_transfer=True) if for_transfer else packer.pack(scenes)
    return b, (patch_targets(scenes) if want_targets else None)


def packed_logits(model: nn.Module, batch: PackedBatch, attn_layers: tuple[int, ...] = ()
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits at the supervised positions of a packed batch [N, vocab], and, when `attn_layers` is given (eager
    attention needed), the attention-grounding loss: mean over questions naming objects and over those layers of
    -log(share of the answer position's head-mean vision attention on the named objects' patches)."""
    logits, ground, _ = packed_forward(model, batch, attn_layers)
    return logits, ground


def packed_forward(model: nn.Module, batch: PackedBatch, attn_layers: tuple[int, ...] = (),
                   hidden_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`packed_logits`, plus the language model's hidden states after `hidden_layer` layers at the supervised
    positions [N, D] when `hidden_layer` is given (None otherwise)."""
    out = model.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                      attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                      output_attentions=bool(attn_layers), output_hidden_states=hidden_layer is not None)
    logits = model.lm_head(out.last_hidden_state[batch.target_rows, batch.target_cols])
    hidden = None if hidden_layer is None else out.hidden_states[hidden_layer][batch.target_rows, batch.target_cols]
    if not attn_layers:
        return logits, None, hidden
    v0 = batch.image_start
    named = batch.named_mask  # [N, 576]
    has = named.any(-1)
    if not bool(has.any()):
        return logits, logits.sum() * 0.0, hidden
    terms = []
    for l in attn_layers:
        rows = out.attentions[l][batch.target_rows, :, batch.target_cols].mean(1)  # [N, T]
        vis = rows[:, v0:v0 + GRID * GRID][has]  # [N', 576]
        share = (vis * named[has]).sum(-1) / vis.sum(-1).clamp_min(1e-9)
        terms.append(-torch.log(share.clamp_min(1e-6)))
    return logits, torch.cat(terms).mean(), hidden


@torch.no_grad()
def packed_accuracy(model: nn.Module, packer: Packer, split: str, n_scenes: int) -> dict[str, float]:
    """Exact-match accuracy of the answer word per family on the first `n_scenes` full-world scenes of a split."""
    was = model.training
    model.eval()
    start, _ = split_seeds(split)
    hits: dict[str, list[bool]] = {f: [] for f in FAMILIES}
    opts = WorldOptions(questions_per_family=2)
    for i in range(0, n_scenes, 8):
        scenes = [make_scene(start + j, opts) for j in range(i, min(i + 8, n_scenes))]
        batch = packer.pack(scenes, with_eos=False).to(model.device)
        pred = packed_logits(model, batch)[0].argmax(-1).cpu()
        for ok, fam in zip((pred == batch.target_ids.cpu()).tolist(), batch.families):
            hits[fam].append(ok)
    model.train(was)
    res = {f: float(np.mean(v)) for f, v in hits.items() if v}
    res["overall"] = float(np.mean([x for v in hits.values() for x in v]))
    return res


def run_stage2(model: nn.Module, processor, out: Path, steps: int, minutes: float, batch: int, seed: int,
               lr: float, eval_every: int, tower_lr_scale: float = 0.0, patch_weight: float = 0.0,
               attn_weight: float = 0.0, attn_layers: tuple[int, ...] = (), save_every: int = 50,
               log_every: int = 20, eval_scenes: int = 96, position_weight: float = 0.0,
               schedule: str = "shipped", locate_weight: float = 0.0, locate_layer: int = 5,
               workers: int = 0) -> None:
    """Train projector + language model on packed questions; resumes from out/stage2.pt. Runs on the model's
    device; `workers` processes make the batches ahead (0: made in this process, one step at a time).

    The tower is frozen when `tower_lr_scale` is 0, else tuned too at `tower_lr_scale` times the learning rate;
    with `patch_weight` > 0 it keeps learning the stage-1 per-patch labels (stage-1 heads) alongside the questions.
    With `attn_weight` > 0 the answer position's attention at `attn_layers` is pulled onto the named objects'
    patches (the generator's masks), which needs eager attention in the language model during training.
    With `position_weight` > 0 a `PositionHead` on the projector's output is trained with the questions.
    With `locate_weight` > 0 a `LocateHead` reads the named objects' centres from the answer positions' hidden
    states after `locate_layer` language-model layers.
    `schedule` names the curriculum (`CURRICULA`): "shipped" from scratch, "relations" to fine-tune.
    """
    if schedule not in CURRICULA:
        raise ValueError(f"unknown curriculum {schedule!r}; known: {sorted(CURRICULA)}")
    device = model.device
    if attn_weight <= 0:
        attn_layers = ()
    elif attn_layers:
        model.model.language_model.config._attn_implementation = "eager"
    ckpt = out / "stage2.pt"
    tower = model.model.vision_tower
    tower.requires_grad_(tower_lr_scale > 0)
    heads = PatchHeads(model.config.vision_config.hidden_size).to(device)
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if patch_weight > 0:
        if tower_lr_scale <= 0:
            raise ValueError("patch_weight > 0 needs a tuned tower: set tower_lr_scale > 0")
        heads.load_state_dict(torch.load(out / "stage1.pt", map_location="cpu")["heads"])
        layer = model.config.vision_feature_layer

        def grab(module: nn.Module, args: tuple, output) -> None:
            captured["feats"] = output.hidden_states[layer][:, 1:]  # [B, 576, D_vision]

        hook = tower.register_forward_hook(grab)
    else:
        heads.requires_grad_(False)
    position = PositionHead(model.config.text_config.hidden_size).to(device)
    proj_hook = None
    if position_weight > 0:
        def grab_embeds(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured["embeds"] = output.reshape(-1, GRID * GRID, output.shape[-1])  # [B, 576, D_text]

        proj_hook = model.model.multi_modal_projector.register_forward_hook(grab_embeds)
    else:
        position.requires_grad_(False)
    n_layers = model.config.text_config.num_hidden_layers
    if locate_weight > 0 and not 1 <= locate_layer <= n_layers:
        raise ValueError(f"locate_layer must be within 1..{n_layers} (language-model layers), got {locate_layer}")
    locate = LocateHead(model.config.text_config.hidden_size).to(device)
    locate.requires_grad_(locate_weight > 0)
    tower_ids = {id(p) for p in tower.parameters()} | {id(p) for p in heads.parameters()}
    params = [p for n, p in model.named_parameters() if p.requires_grad] + [
        p for p in list(heads.parameters()) + list(position.parameters()) + list(locate.parameters())
        if p.requires_grad]
    groups = []
    for is_tower, scale in ((False, 1.0), (True, tower_lr_scale)):
        for wd in (0.01, 0.0):
            ps = [p for p in params if (id(p) in tower_ids) == is_tower and (p.ndim >= 2) == (wd > 0)]
            if ps:
                groups.append({"params": ps, "weight_decay": wd, "scale": scale})
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    start, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        if "position" in state:
            position.load_state_dict(state["position"])
        if "locate" in state:
            locate.load_state_dict(state["locate"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
        print(f"[stage2] resumed at step {start} ({elapsed / 60:.1f} min used)", flush=True)

    def checkpoint() -> dict:
        return {"model": model.state_dict(), "heads": heads.state_dict(), "position": position.state_dict(),
                "locate": locate.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed}

    packer = Packer(processor)
    source = Prefetcher(stage2_worker_batch if workers else functools.partial(stage2_batch, packer), workers)
    want_targets = patch_weight > 0 or position_weight > 0
    model.train()
    if tower_lr_scale <= 0:
        tower.eval()
    budget = minutes * 60
    step = start
    t_last = time.time()
    answers = 0
    while True:
        progress = max(step / steps, elapsed / budget)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = g["scale"] * lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        # a batch ahead is made at the progress known now (for this step's own batch, exactly `progress`)
        b, targets = source.get(step, lambda s: (seed, s, max(s / steps, elapsed / budget), batch, schedule,
                                                 want_targets))
        b = b.to(device)
        if targets is not None:
            targets = {k: v.to(device) for k, v in targets.items()}
        logits, ground, hidden = packed_forward(model, b, attn_layers, locate_layer if locate_weight > 0 else None)
        loss = nn.functional.cross_entropy(logits, b.target_ids)
        loc_loss = None
        if hidden is not None:
            loc_loss = locate.loss(hidden, b.named_xy)
            loss = loss + locate_weight * loc_loss
        if ground is not None:
            loss = loss + attn_weight * ground
        if patch_weight > 0:
            loss = loss + patch_weight * patch_loss(heads(captured.pop("feats")), targets)
        pos_loss = None
        if position_weight > 0:
            pos_loss = position.loss(captured.pop("embeds"), targets["color"] > 0)
            loss = loss + position_weight * pos_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        answers += int(b.is_answer.sum())
        if step % log_every == 0:
            with torch.no_grad():
                acc = (logits.argmax(-1) == b.target_ids)[b.is_answer].float().mean().item()
            print(f"[stage2] step {step} progress {progress:.3f} loss {loss.item():.4f} train-acc {acc:.3f} "
                  + (f"ground {ground.item():.3f} " if ground is not None else "")
                  + (f"pos-mse {pos_loss.item():.4f} " if pos_loss is not None else "")
                  + (f"locate-mse {loc_loss.item():.4f} " if loc_loss is not None else "") +
                  f"lr {opt.param_groups[0]['lr']:.2e} {elapsed / 60:.1f} min, {answers / log_every:.0f} answers/step",
                  flush=True)
            answers = 0
        if step % eval_every == 0:
            acc = packed_accuracy(model, packer, "calibration", max(8, eval_scenes // 2))
            print("[stage2] held-out (calibration) " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
            t_last = time.time()  # evaluation time does not count against the budget
        if step % save_every == 0:
            _atomic_save(checkpoint(), ckpt)
    source.close()
    _atomic_save(checkpoint(), ckpt)
    for h in (hook, proj_hook):
        if h is not None:
            h.remove()
    acc = packed_accuracy(model, packer, "calibration", eval_scenes)
    print(f"[stage2] done at step {step}: held-out " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    """Command line: both stages, then save_pretrained (model + processor) into OUT/final."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("checkpoints"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when present)")
    ap.add_argument("--workers", type=int, default=0,
                    help="processes that render and pack the coming batches ahead (0: in the training process; "
                         "on a GPU the CPU work is the bottleneck without them)")
    ap.add_argument("--stage1-steps", type=int, default=500)
    ap.add_argument("--stage1-batch", type=int, default=16)
    ap.add_argument("--stage1-lr", type=float, default=2e-3)
    ap.add_argument("--stage2-steps", type=int, default=3000)
    ap.add_argument("--stage2-minutes", type=float, default=60.0, help="wall-clock budget of stage 2")
    ap.add_argument("--stage2-batch", type=int, default=4, help="images per step (all their questions packed)")
    ap.add_argument("--stage2-lr", type=float, default=1e-3)
    ap.add_argument("--stage2-tower-lr-scale", type=float, default=0.0,
                    help="0: vision tower frozen in stage 2; > 0: tuned at this fraction of the stage-2 lr")
    ap.add_argument("--stage2-patch-weight", type=float, default=0.0,
                    help="> 0: keep the stage-1 per-patch loss on the tower during stage 2, with this weight")
    ap.add_argument("--stage2-attn-weight", type=float, default=0.0,
                    help="> 0: pull the answer position's attention onto the named objects at --stage2-attn-layers")
    ap.add_argument("--stage2-attn-layers", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--stage2-position-weight", type=float, default=0.0,
                    help="> 0: train a linear (x, y) read-out of the projector's output with this weight")
    ap.add_argument("--stage2-locate-weight", type=float, default=0.0,
                    help="> 0: train a read-out of the named objects' centres from the answer positions' hidden "
                         "states (after --stage2-locate-layer language-model layers) with this weight")
    ap.add_argument("--stage2-locate-layer", type=int, default=5)
    ap.add_argument("--stage2-curriculum", choices=sorted(CURRICULA), default="shipped",
                    help="stage-2 world schedule: 'shipped' (from scratch), 'relations' (fine-tuning)")
    ap.add_argument("--init-model", type=Path, default=None,
                    help="start stage 2 from this trained model (a save_pretrained folder) and skip stage 1")
    ap.add_argument("--eval-every", type=int, default=200, help="stage-2 steps between held-out evaluations")
    ap.add_argument("--eval-scenes", type=int, default=96, help="calibration scenes of the final evaluation")
    ap.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (stage 1: twice this)")
    ap.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    args = ap.parse_args(argv)
    if args.workers < 0:
        raise SystemExit(f"--workers must be 0 or more, got {args.workers}")
    try:
        device = resolve_device(args.device)
    except ModelConfigError as err:
        raise SystemExit(f"--device: {err}") from err
    if device.type == "cuda":  # TF32 matrix products: float32 weights and optimizer, faster products
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # every random init of the run (model, heads) follows the seed
    args.out.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    if args.init_model is not None:
        if not (args.init_model / "config.json").is_file():
            raise SystemExit(f"--init-model {args.init_model}: no config.json there; give a save_pretrained folder "
                             "such as vlm/assets/shapes_llava")
        if args.stage2_patch_weight > 0 and not (args.out / "stage1.pt").is_file():
            raise SystemExit(f"--init-model skips stage 1: --stage2-patch-weight needs the stage-1 heads of the "
                             f"model's tower in {args.out / 'stage1.pt'} (copy it from the model's training run)")
        model = LlavaForConditionalGeneration.from_pretrained(args.init_model, dtype=torch.float32)
    else:
        model = build_demo_model(args.seed)
    model.to(device)
    print(f"[train] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}; "
          f"args {vars(args)}", flush=True)
    if args.init_model is None:
        run_stage1(model, args.out, args.stage1_steps, args.stage1_batch, args.seed, args.stage1_lr,
                   save_every=2 * args.save_every, log_every=args.log_every, workers=args.workers)
        if (args.out / "stage1.pt").exists():  # stage 2 always starts from the finished tower
            model.model.vision_tower.load_state_dict(torch.load(args.out / "stage1.pt", map_location="cpu")["tower"])
    run_stage2(model, processor, args.out, args.stage2_steps, args.stage2_minutes, args.stage2_batch, args.seed,
               args.stage2_lr, args.eval_every, args.stage2_tower_lr_scale,
               args.stage2_patch_weight, args.stage2_attn_weight, tuple(args.stage2_attn_layers),
               save_every=args.save_every, log_every=args.log_every, eval_scenes=args.eval_scenes,
               position_weight=args.stage2_position_weight, schedule=args.stage2_curriculum,
               locate_weight=args.stage2_locate_weight, locate_layer=args.stage2_locate_layer,
               workers=args.workers)
    final = args.out / "final"
    model.model.language_model.config._attn_implementation = "sdpa"  # training may have switched it to eager
    model.config._attn_implementation = "sdpa"
    model.eval().to("cpu")
    model.save_pretrained(final, safe_serialization=True)
    processor.save_pretrained(final)
    print(f"[train] saved {final}", flush=True)


if __name__ == "__main__":
    main()
