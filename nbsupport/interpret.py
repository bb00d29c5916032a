"""Measured interpretability of MESM's cross-modal attention (Chapter 6).

Dai et al. (2021, Sec. 5.3) *looked at* MESM's attention maps and saw them land on facial action
units (FACS) and on energetic regions of the mel-spectrogram. The synthetic corpus saves where the
cues really are (``cue.pkl``: per frame the union mask of the active AU regions in image
coordinates, and the audio cue's time-frequency box), so here we *measure* it:

* the cue region is mapped to the model's input (48x48 face crop, 128x32 mel piece) and then to
  each sparse layer's grid as the **fraction of every cell inside the region** (area pooling);
* per frame/piece, ``attention share`` = attention mass on the region = ``sum(a * r) / sum(a)``,
  ``kept share`` = share of the kept sites inside it = ``sum(k * r) / sum(k)``, and **chance** = the
  region's share of the sites that were available (active) = ``sum(act * r) / sum(act)``: what a
  uniform attention / a random selection would score. A ratio share/chance above 1 means the
  attention prefers the cue.

Only frames/pieces whose region is non-empty are averaged (a neutral face has no active AU).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import cv2
import librosa
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats

from tqdm.auto import tqdm

from nbsupport import evidence
from nbsupport.base import to_device
from nbsupport.data import features
from nbsupport.data.raw import read_cues, read_frame
from nbsupport.models.mesm import extractor_macs

__all__ = ["region_to_grid", "cue_shares", "layer_cue_table", "audio_box_to_pieces", "summarize_cue_table",
           "lift_intervals", "LiftTracker", "lift_verdicts", "draw_lift_by_epoch",
           "face_crop_box", "face_region_from_box", "CueRegions", "measure_cue_attention", "utterance_maps",
           "draw_maps", "one_utterance_per_emotion", "maps_figure", "single_utterance", "draw_kept_sites",
           "AnalysisPlan", "analysis_plan", "ANALYSES", "COMPARISONS", "cue_sums", "kept_sites_state",
           "seed_lift_intervals", "seed_lift_verdicts"]


def region_to_grid(region: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Fraction of each cell of a (h, w) grid covered by ``region`` (N, H, W) (bool or [0,1] float).

    Area pooling (``adaptive_avg_pool2d``) from the input resolution to a layer's grid; H/h and W/w
    are integers for MESM's layers (48 -> 24/12/6, 128x32 -> 64x16/32x8/16x4). Returns (N, h, w).
    """
    region = torch.as_tensor(region).float()
    if region.dim() != 3:
        raise ValueError(f"region_to_grid: 'region' must be (N, H, W), got shape {tuple(region.shape)}")
    return F.adaptive_avg_pool2d(region[:, None], tuple(int(g) for g in grid))[:, 0]


def cue_shares(attention: torch.Tensor | None, kept: torch.Tensor, active: torch.Tensor,
               region: torch.Tensor) -> dict:
    """Per-frame shares on one layer: attention mass, kept sites and chance inside the cue ``region``.

    attention (N,h,w) float (None: not measured), kept / active (N,h,w) bool, region (N,h,w) in [0,1]
    (from :func:`region_to_grid`). Frames with an empty region or no kept site are dropped. Returns
    numpy arrays ``attention_share``, ``kept_share``, ``chance`` (one value per kept frame) and ``rows``.
    """
    kept, active, region = kept.float(), active.float(), region.float()
    if not (kept.shape == active.shape == region.shape):
        raise ValueError(f"cue_shares: kept {tuple(kept.shape)}, active {tuple(active.shape)} and region "
                         f"{tuple(region.shape)} must have the same (N, h, w) shape")
    dims = (1, 2)
    chance = (active * region).sum(dims) / active.sum(dims).clamp_min(1e-12)
    kept_share = (kept * region).sum(dims) / kept.sum(dims).clamp_min(1e-12)
    use = ((region * active).sum(dims) > 0) & (kept.sum(dims) > 0)
    out = {"kept_share": kept_share[use].numpy(), "chance": chance[use].numpy(), "rows": use.nonzero()[:, 0].numpy()}
    if attention is not None:
        a = attention.float() * active
        out["attention_share"] = ((a * region).sum(dims) / a.sum(dims).clamp_min(1e-12))[use].numpy()
    return out


def layer_cue_table(records: Sequence, regions: torch.Tensor, modality: str, owners: Sequence | None = None
                    ) -> pd.DataFrame:
    """One row per layer: mean attention share, kept share and chance over frames with a cue region.

    ``records``: the model's ``last_maps[modality]`` (:class:`nbsupport.models.mesm.LayerRecord` with
    ``attention``, ``kept``, ``active``); ``regions`` (N, H, W): the cue region of every frame/piece of
    that forward pass, in model-input coordinates, in the same order as the records' rows. With
    ``owners`` (the utterance id of each of the N rows) the table instead has one row per layer and
    utterance, with the *sums* over that utterance's frames (``attention_sum``, ``kept_sum``,
    ``chance_sum``): what :func:`lift_intervals` resamples.
    """
    rows = []
    for i, rec in enumerate(records):
        grid = rec.kept.shape[1:]
        s = cue_shares(rec.attention, rec.kept, rec.active, region_to_grid(regions, grid))
        base = dict(modality=modality, layer=i + 1, grid=f"{grid[0]}x{grid[1]}")
        if owners is not None:
            frames = pd.DataFrame({"utterance": np.asarray(owners, dtype=object)[s["rows"]],
                                   "attention_sum": s.get("attention_share", np.full(len(s["rows"]), np.nan)),
                                   "kept_sum": s["kept_share"], "chance_sum": s["chance"]})
            per = frames.groupby("utterance", sort=False).agg(
                n=("chance_sum", "size"), attention_sum=("attention_sum", "sum"), kept_sum=("kept_sum", "sum"),
                chance_sum=("chance_sum", "sum")).reset_index()
            rows.extend({**base, **r} for r in per.to_dict("records"))
            continue
        n = len(s["chance"])
        rows.append(dict(**base, n=n,
                         attention_share=float(np.mean(s["attention_share"])) if n else np.nan,
                         kept_share=float(np.mean(s["kept_share"])) if n else np.nan,
                         chance=float(np.mean(s["chance"])) if n else np.nan))
    return pd.DataFrame(rows)


def summarize_cue_table(tables: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Frame-weighted mean of several :func:`layer_cue_table` results (e.g. one per batch), with the
    lift = share / chance (1 = no better than chance)."""
    df = pd.concat(list(tables), ignore_index=True)
    df = df[df["n"] > 0]
    cols = ["attention_share", "kept_share", "chance"]
    w = df[cols].mul(df["n"], axis=0)
    w[["modality", "layer", "grid", "n"]] = df[["modality", "layer", "grid", "n"]]
    out = w.groupby(["modality", "layer", "grid"], as_index=False).sum(numeric_only=True)
    out[cols] = out[cols].div(out["n"], axis=0)
    out["attention_lift"] = out["attention_share"] / out["chance"]
    out["kept_lift"] = out["kept_share"] / out["chance"]
    return out


def lift_intervals(per_utterance: pd.DataFrame, *, resamples: int = evidence.BOOTSTRAP_RESAMPLES,
                   level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Chapter 6's cue table with a bootstrap interval on each lift, resampling *test utterances*.

    ``per_utterance``: :func:`layer_cue_table` rows with ``owners`` (sums per layer and utterance).
    Per modality and layer: the shares and chance (frame-weighted means, as :func:`summarize_cue_table`
    gives them), ``attention_lift`` / ``kept_lift`` = sum of shares / sum of chance over the frames, and
    their 95 % intervals (``*_low``, ``*_high``; :func:`nbsupport.evidence.ratio_interval`) with
    ``n_utterances``, the utterances that had a cue region. A lift whose interval excludes 1 is a verdict.
    """
    rows = []
    for (m, layer, grid), g in per_utterance.groupby(["modality", "layer", "grid"], sort=True):
        n = float(g["n"].sum())
        row = dict(modality=m, layer=layer, grid=grid, n=int(n), n_utterances=len(g),
                   attention_share=g["attention_sum"].sum() / n, kept_share=g["kept_sum"].sum() / n,
                   chance=g["chance_sum"].sum() / n)
        for what in ("attention", "kept"):
            est = evidence.ratio_interval(g[f"{what}_sum"].to_numpy(), g["chance_sum"].to_numpy(),
                                          resamples=resamples, level=level, seed=seed)
            row.update({f"{what}_lift": est.value, f"{what}_lift_low": est.low, f"{what}_lift_high": est.high})
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# From the corpus' cue.pkl (read by nbsupport.data.read_cues) to model-input coordinates
# ------------------------------------------------------------------------------------------------
def audio_box_to_pieces(box: dict, n_pieces: int, *, sr: int = 16000, hop: int = 200, n_mels: int = 128,
                        piece: int = 32, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """The audio cue's time-frequency box -> (P, n_mels, piece) bool masks on MESM's mel pieces.

    ``box`` = {"t0", "t1" (s), "f0_hz", "f1_hz"}. Frame ``j`` of the log-mel (librosa, centred
    frames) sits at ``j * hop / sr`` seconds; mel band ``m`` is inside when its centre frequency
    (``librosa.mel_frequencies``) lies in [f0_hz, f1_hz]. Pieces are consecutive ``piece``-frame cuts
    (:func:`nbsupport.data.features.mel_pieces`).
    """
    for key in ("t0", "t1", "f0_hz", "f1_hz"):
        if key not in box:
            raise KeyError(f"audio_box_to_pieces: 'box' lacks field '{key}' (expected t0, t1, f0_hz, f1_hz)")
    centres = librosa.mel_frequencies(n_mels + 2, fmin=fmin, fmax=fmax or sr / 2)[1:-1]  # (n_mels,)
    freq_in = (centres >= box["f0_hz"]) & (centres <= box["f1_hz"])
    times = np.arange(n_pieces * piece) * hop / sr
    time_in = (times >= box["t0"]) & (times <= box["t1"])
    full = freq_in[:, None] & time_in[None, :]  # (n_mels, P*piece)
    return np.ascontiguousarray(full.reshape(n_mels, n_pieces, piece).transpose(1, 0, 2))


def face_crop_box(img_bgr: np.ndarray) -> tuple[int, int, int]:
    """(x0, y0, side) of the square that :func:`nbsupport.data.features.face_crop` crops from a frame,
    used to draw MESM's attention on the face back onto the frame (Chapter 6); see
    :func:`nbsupport.data.features.face_box`."""

    x0, y0, s, _ = features.face_box(img_bgr)
    return x0, y0, s


def face_region_from_box(mask: np.ndarray, box, size: int = 48) -> np.ndarray:
    """AU mask (H, W) -> area fractions on the ``size`` face crop taken with ``box`` = (x0, y0, side).

    The mask is cut exactly as the crop itself (``grey[y0:y0+s, x0:x0+s]``, so clipped by the image
    border) and resized with area interpolation (OpenCV INTER_AREA), which gives each crop pixel its
    covered fraction."""
    x0, y0, s = (int(v) for v in box)
    sub = np.asarray(mask, np.float32)[y0:y0 + s, x0:x0 + s]
    return np.clip(cv2.resize(sub, (size, size), interpolation=cv2.INTER_AREA), 0.0, 1.0)  # float round-off


class CueRegions:
    """Ground-truth cue regions of a MESM dataset's utterances on the model's inputs (Ch. 6).

    ``CueRegions(ds, img_interval=500)`` with ``ds`` from :func:`nbsupport.data.mesm_dataset` (its raw
    split gives the corpus folders). ``faces(uid)`` -> (T, 48, 48) area fractions of the active AU
    regions on each sampled face crop; ``mel(uid, n_pieces)`` -> (P, 128, 32) audio cue box (empty when
    the audio shows no emotion). Results are cached per utterance.
    """

    def __init__(self, ds, img_interval: float = 500):
        self.raw, self.img_interval = ds.raw, img_interval
        self.index = {uid: i for i, uid in enumerate(self.raw.ids)}
        self._faces: dict = {}
        self._cues: dict = {}

    def _cue(self, uid):
        """The utterance's ``cue.pkl`` (read once, from its folder in the raw split)."""
        if uid not in self._cues:
            self._cues[uid] = read_cues(self.raw.folders[self.index[uid]])
        return self._cues[uid]

    def faces(self, uid: str) -> np.ndarray:
        """(T, 48, 48) area fractions of the active AU regions on each sampled face crop of ``uid``."""
        if uid not in self._faces:
            cue = self._cue(uid)
            paths, pos = self.raw.sample_frames(self.index[uid], self.img_interval)
            idx = self.raw.frames(self.index[uid])[1]
            where = {k: j for j, k in enumerate(cue["frame_index"])}
            out = []
            for p in pos:
                mask = cue["au_mask"][where[idx[p]]] if idx[p] in where else np.zeros(cue["image_size"], bool)
                out.append(face_region_from_box(mask, face_crop_box(read_frame(paths[p]))))
            self._faces[uid] = np.stack(out)
        return self._faces[uid]

    def mel(self, uid: str, n_pieces: int) -> np.ndarray:
        """(n_pieces, 128, 32) bool audio cue box of ``uid`` on its mel pieces (all False when the audio
        shows no emotion)."""
        cue = self._cue(uid)
        if all(p == "neutral" for p in cue.get("shown", {}).get("A", ["?"])):
            return np.zeros((n_pieces, 128, 32), bool)
        return audio_box_to_pieces(cue["audio_box"], n_pieces)

    def for_batch(self, batch: dict, modality: str) -> torch.Tensor:
        """Regions (N, H, W) of every real frame ("V") or piece ("A") of a ``collate_mesm`` batch, in
        the row order of the model's :class:`~nbsupport.models.mesm.LayerRecord` (batch-major)."""
        mask = batch["faces_mask" if modality == "V" else "mel_mask"]
        parts = []
        for b, uid in enumerate(batch["ids"]):
            n = int(mask[b].sum())
            r = self.faces(uid) if modality == "V" else self.mel(uid, n)
            if r.shape[0] != n:
                raise ValueError(f"CueRegions: utterance {uid!r} has {n} {modality} inputs in the batch but "
                                 f"{r.shape[0]} cue regions (img_interval mismatch?)")
            parts.append(torch.as_tensor(np.asarray(r, np.float32)))
        return torch.cat(parts)


@torch.no_grad()
def cue_sums(model, loader, cues: CueRegions, *, device="cpu", max_batches: int | None = None,
             progress: bool = True) -> pd.DataFrame:
    """The attention mass, kept sites and chance inside the cue regions, summed per modality, layer and
    test utterance over ``loader`` (:func:`layer_cue_table` with owners; the model in eval mode, no
    gradient): what :func:`lift_intervals` resamples for one model and :func:`seed_lift_intervals` for
    one model per training seed (Chapter 6's measured interpretability)."""
    was_training = model.training
    model.eval()
    tables = []
    for k, batch in enumerate(tqdm(loader, desc="cue regions", disable=not progress, leave=False)):
        if max_batches is not None and k >= max_batches:
            break
        model(to_device(batch, device))
        for m, records in model.last_maps.items():
            mask = batch["faces_mask" if m == "V" else "mel_mask"]
            owners = np.repeat(np.asarray(batch["ids"], dtype=object), mask.sum(1).cpu().numpy().astype(int))
            tables.append(layer_cue_table(records, cues.for_batch(batch, m), m, owners=owners))
    model.train(was_training)
    return pd.concat(tables, ignore_index=True)


def measure_cue_attention(model, loader, cues: CueRegions, *, device="cpu", max_batches: int | None = None,
                          progress: bool = True, resamples: int = evidence.BOOTSTRAP_RESAMPLES,
                          seed: int = 0) -> pd.DataFrame:
    """Share of attention mass and of kept sites inside the cue regions vs chance, per modality and
    layer, over ``loader`` (Ch. 6's measured interpretability), each lift with its bootstrap interval
    over the test utterances; see :func:`lift_intervals`."""
    sums = cue_sums(model, loader, cues, device=device, max_batches=max_batches, progress=progress)
    return lift_intervals(sums, resamples=resamples, seed=seed)


def seed_lift_intervals(per_seed: Mapping, what: str = "attention", *, resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """The lift on the cue regions of a *method*, across training seeds (Chapter 6's lift verdicts).

    ``per_seed[s]``: :func:`cue_sums` of the model trained with seed ``s``, all on one test split. Per
    modality and layer, seed ``s``'s lift is the sum of its ``{what}_sum`` over the utterances divided by
    the sum of ``chance_sum``; ``lift`` is their mean over the ``S`` seeds. Its interval counts both
    sources of variance, as :func:`nbsupport.evidence.seed_difference` does for a score: the variance
    over seeds divided by ``S`` (training again) plus the variance of the seed-averaged lift under a
    bootstrap over test utterances (one resample of utterances shared by every seed), with Student's t
    at ``S - 1`` degrees of freedom. NaN interval with fewer than two seeds.
    Returns one row per modality and layer: ``n_seeds``, ``n_utterances``, ``lift``, ``low``, ``high``,
    ``level`` and ``per_seed`` ({seed: lift})."""
    if not per_seed:
        raise ValueError("seed_lift_intervals: 'per_seed' is empty (no measured seed)")
    seeds = sorted(per_seed)
    rng, rows = np.random.default_rng(seed), []
    keys = sorted(set.intersection(*[set(map(tuple, per_seed[s][["modality", "layer"]].to_numpy()))
                                     for s in seeds]))
    for m, layer in keys:
        tabs = [per_seed[s][(per_seed[s]["modality"] == m) & (per_seed[s]["layer"] == layer)]
                .groupby("utterance")[[f"{what}_sum", "chance_sum"]].sum() for s in seeds]
        utts = sorted(set.intersection(*[set(t.index) for t in tabs]))
        num = np.stack([t.loc[utts, f"{what}_sum"].to_numpy(float) for t in tabs])   # (S, n)
        den = np.stack([t.loc[utts, "chance_sum"].to_numpy(float) for t in tabs])
        lifts = num.sum(1) / np.maximum(den.sum(1), 1e-12)
        value, n_seeds, n = float(lifts.mean()), len(seeds), len(utts)
        low = high = float("nan")
        if n_seeds >= 2 and n >= 2 and np.all(np.isfinite(lifts)):
            idx = rng.integers(0, n, (resamples, n))
            boot = (num[:, idx].sum(-1) / np.maximum(den[:, idx].sum(-1), 1e-12)).mean(0)
            var = np.var(lifts, ddof=1) / n_seeds + np.var(boot, ddof=1)
            half = float(stats.t.ppf(0.5 + level / 2, n_seeds - 1) * np.sqrt(var))
            low, high = value - half, value + half
        rows.append(dict(modality=m, layer=int(layer), n_seeds=n_seeds, n_utterances=n, lift=value, low=low,
                         high=high, level=level, per_seed={int(s): float(v) for s, v in zip(seeds, lifts)}))
    return pd.DataFrame(rows)


def seed_lift_verdicts(table: pd.DataFrame, what: str = "the attention", label: str = "") -> dict:
    """Chapter 6's lift verdicts across training seeds, one per row of :func:`seed_lift_intervals`, keyed
    ``"lift_{modality}_layer{layer}"`` (with ``label`` in front of the sentence): ``decision`` is
    ``"cue regions"`` (the interval lies above 1: the attention prefers the cues), ``"elsewhere"`` (below
    1) or ``"undecided"``; with ``sentence``, ``value``, ``low``, ``high``, ``n_seeds`` and ``per_seed``,
    the fields every verdict in ``metrics.json`` carries."""
    out = {}
    for r in table.sort_values(["modality", "layer"]).itertuples():
        head = f"{label}{r.modality} layer {r.layer}: {what}, over {r.n_seeds} training seeds: lift {r.lift:.3f}"
        finite = bool(np.isfinite(r.low))
        decision = "cue regions" if finite and r.low > 1 else "elsewhere" if finite and r.high < 1 else "undecided"
        if not finite:
            sentence = f"{head}; fewer than two seeds, so no interval and no verdict."
        else:
            ci = f"{100 * r.level:.0f} % interval [{r.low:.3f}, {r.high:.3f}]"
            sentence = f"{head}, {ci}: " + {
                "cue regions": "it prefers the cue regions (above 1), across training seeds.",
                "elsewhere": "it avoids the cue regions (below 1), across training seeds.",
                "undecided": "not distinguishable from chance across training seeds."}[decision]
        out[f"lift_{r.modality}_layer{r.layer}"] = dict(
            decision=decision, sentence=sentence, value=float(r.lift), low=float(r.low) if finite else None,
            high=float(r.high) if finite else None, n_seeds=int(r.n_seeds),
            per_seed=[{"seed": s, "lift": v} for s, v in r.per_seed.items()])
    return out


class LiftTracker:
    """The attention's lift on the cue regions, measured as training goes (Chapter 6, lift against epochs).

    A :func:`nbsupport.train.fit` callback: after every epoch it runs :func:`measure_cue_attention` on
    ``loader`` (the model in eval mode, no gradient, no random numbers drawn, so training is unchanged)
    and keeps the table with an ``epoch`` column; call it once with epoch 0 before training for the
    untrained model. ``table`` holds every measurement; :meth:`final` the last epoch's.
    """

    def __init__(self, model, loader, cues: CueRegions, *, device="cpu",
                 resamples: int = evidence.BOOTSTRAP_RESAMPLES, seed: int = 0):
        self.model, self.loader, self.cues, self.device = model, loader, cues, device
        self.resamples, self.seed, self.tables = resamples, seed, []

    def __call__(self, epoch: int, row: dict | None = None) -> None:
        t = measure_cue_attention(self.model, self.loader, self.cues, device=self.device, progress=False,
                                  resamples=self.resamples, seed=self.seed)
        self.tables.append(t.assign(epoch=int(epoch)))

    @property
    def table(self) -> pd.DataFrame:
        """Every measurement so far, one row per epoch, modality and layer."""
        return pd.concat(self.tables, ignore_index=True) if self.tables else pd.DataFrame()

    def final(self) -> pd.DataFrame:
        """The rows of the last measured epoch."""
        t = self.table
        return t[t["epoch"] == t["epoch"].max()].reset_index(drop=True)


def lift_verdicts(table: pd.DataFrame, what: str = "attention", label: str = "") -> list[str]:
    """One sentence per modality and layer of a :func:`lift_intervals` table, each computed from the
    interval of ``{what}_lift`` (``what`` = "attention" or "kept"; Chapter 6's interpretability verdict)."""
    noun = {"attention": "the attention", "kept": "the kept sites"}[what]
    return [evidence.lift_verdict(f"{label}{r.modality} layer {r.layer}: {noun}",
                                  evidence.Estimate(r[f"{what}_lift"], r[f"{what}_lift_low"],
                                                    r[f"{what}_lift_high"]))
            for _, r in table.sort_values(["modality", "layer"]).iterrows()]


# ------------------------------------------------------------------------------------------------
# Pictures (Ch. 6): attention maps and kept sites over faces and mel-spectrograms
# ------------------------------------------------------------------------------------------------
def utterance_maps(model, batch: dict, b: int, modality: str) -> tuple[np.ndarray, list[dict]]:
    """After a forward pass on ``batch``: the input image of utterance ``b`` and, per layer, its
    attention and kept masks. Faces: the middle real frame (48x48); audio: the pieces side by side
    (128 x 32P). Returns ``(image, [{"attention", "kept", "active"} (h, w) arrays per layer])``."""
    x_key, m_key = ("faces", "faces_mask") if modality == "V" else ("mel", "mel_mask")
    n = int(batch[m_key][b].sum())
    layers = []
    for rec in model.last_maps[modality]:
        rows = (rec.frame_index[:, 0] == b).nonzero()[:, 0]
        if modality == "V":
            rows = rows[len(rows) // 2: len(rows) // 2 + 1]
        layers.append({k: torch.cat(list(getattr(rec, k)[rows]), dim=1).float().numpy()
                       for k in ("attention", "kept", "active")})
    x = batch[x_key][b, :n].float()
    image = x[n // 2].numpy() if modality == "V" else torch.cat(list(x), dim=1).numpy()
    return image, layers


def draw_maps(axes, image: np.ndarray, layers: list[dict], what: str = "attention", cmap_image: str = "gray"):
    """Draw ``image`` with each layer's attention (heat overlay) or kept sites (tinted) on ``axes``."""
    H, W = image.shape
    for ax, layer in zip(axes, layers):
        ax.imshow(image, cmap=cmap_image, origin="lower" if H != W else "upper", aspect="auto")
        if what == "attention":  # heat over the active sites
            data, cmap, alpha = np.where(layer["active"] > 0, layer["attention"], np.nan), "inferno", 0.55
        else:  # dropped sites darkened, kept sites left clear
            data, cmap, alpha = np.where(layer["kept"] > 0, np.nan, 1.0), "Greys", 0.7
        ax.imshow(data, cmap=cmap, alpha=alpha, vmin=None if what == "attention" else 0.0,
                  vmax=None if what == "attention" else 1.0,
                  extent=(-0.5, W - 0.5, -0.5, H - 0.5) if H != W else (-0.5, W - 0.5, H - 0.5, -0.5),
                  origin="lower" if H != W else "upper", aspect="auto", interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])


def one_utterance_per_emotion(batch: dict, emotions: Sequence[str]) -> list[tuple[str, int]]:
    """``[(emotion, b), ...]``: for each emotion (column of ``batch["emotion"]``, names ``emotions``) present
    in the batch, the first utterance ``b`` that holds it and was not picked for an earlier emotion (the
    first that holds it when all were). Emotions absent from the batch are left out."""
    picks: list[tuple[str, int]] = []
    for k, e in enumerate(emotions):
        cands = [int(b) for b in batch["emotion"][:, k].nonzero()[:, 0]]
        fresh = [b for b in cands if b not in [p for _, p in picks]]
        if cands:
            picks.append((e, (fresh or cands)[0]))
    return picks


def maps_figure(model, batch: dict, picks: Sequence[tuple[str, int]], modality: str, *, width: float = 13,
                row_height: float = 1.9):
    """After a forward pass on ``batch``: one row per ``(label, b)`` of ``picks`` (e.g. from
    :func:`one_utterance_per_emotion`), the attention map of each sparse layer of ``modality`` ("V" faces,
    "A" mel-spectrograms) then its kept sites, over the utterance's input (:func:`utterance_maps`,
    :func:`draw_maps`). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt  # local: pyplot costs ~0.5 s; the sweep CLI imports this module and draws nothing

    n = len(model.last_maps[modality])
    cmap = "gray" if modality == "V" else "magma"
    fig, axes = plt.subplots(len(picks), 2 * n, figsize=(width, row_height * len(picks)), squeeze=False)
    for r, (label, b) in enumerate(picks):
        image, layers = utterance_maps(model, batch, b, modality)
        draw_maps(axes[r, :n], image, layers, "attention", cmap)
        draw_maps(axes[r, n:], image, layers, "kept", cmap)
        axes[r, 0].set_ylabel(label, fontsize=9)
    for j in range(n):
        axes[0, j].set_title(f"attention, layer {j + 1}", fontsize=9)
        axes[0, n + j].set_title(f"kept, layer {j + 1}", fontsize=9)
    fig.suptitle({"V": "faces", "A": "mel-spectrograms"}[modality])
    fig.tight_layout()
    return fig


def single_utterance(batch: dict, b: int) -> dict:
    """Utterance ``b`` of a ``collate_mesm`` batch as a batch of one, padding removed (widget input)."""
    out = {}
    nf, nm = int(batch["faces_mask"][b].sum()), int(batch["mel_mask"][b].sum())
    nt = int(batch["attention_mask"][b].sum())
    for k, v in batch.items():
        if k == "ids":
            out[k] = [v[b]]
        elif torch.is_tensor(v):
            v = v[b:b + 1]
            if k in ("faces", "faces_mask"):
                v = v[:, :nf]
            elif k in ("mel", "mel_mask"):
                v = v[:, :nm]
            elif k in ("input_ids", "attention_mask"):
                v = v[:, :nt]
            out[k] = v
    return out


@torch.no_grad()
def draw_kept_sites(model, batch: dict, b: int, top_p: float, fig=None):
    """Chapter 6's widget view: utterance ``b`` run at ``top_p``; kept sites of each sparse layer over
    the middle face frame and over the mel-spectrogram, with the feature extractor's MACs in the title.
    Returns the figure (a new one when ``fig`` is None). ``model.top_p`` is restored afterwards."""
    return kept_sites_state(model, batch, b, top_p, fig=fig)[0]


def kept_sites_state(model, batch: dict, b: int, top_p: float, fig=None):
    """One state of Chapter 6's kept-sites explorer: ``(figure, label)``, the figure of
    :func:`draw_kept_sites` and, as its label, the extractor's MACs at ``top_p`` (MESM's top-p
    selection, Dai et al. 2021) as computed by :func:`extractor_macs` (not read back from the figure)."""
    import matplotlib.pyplot as plt  # local: pyplot costs ~0.5 s; the sweep CLI imports this module and draws nothing

    one = single_utterance(batch, b)
    original, was_training = model.top_p, model.training
    try:
        model.top_p = float(top_p)
        cost = extractor_macs(model, [one])  # eval mode, on the model's device; fills model.last_maps
    finally:
        model.top_p = original
        model.train(was_training)
    mods = [m for m in ("V", "A") if m in model.last_maps]
    fig = fig or plt.figure(figsize=(11, 2.6 * len(mods)))
    fig.clear()
    axes = np.atleast_2d(fig.subplots(len(mods), 3))
    for r, m in enumerate(mods):
        image, layers = utterance_maps(model, one, 0, m)
        draw_maps(axes[r], image, layers, what="kept", cmap_image="gray" if m == "V" else "magma")
        for j, layer in enumerate(layers):
            kept, act = int(layer["kept"].sum()), int(layer["active"].sum())
            axes[r, j].set_title(f"{'face' if m == 'V' else 'mel'} layer {j + 1}: {kept}/{act} sites kept", fontsize=9)
    macs, dense = cost["macs"], cost["dense_macs"]
    label = f"extractor {macs / 1e6:.1f} M MACs ({macs / max(dense, 1):.0%} of dense)"
    fig.suptitle(f"{one['ids'][0]}  top_p = {top_p:.2f}: {label}", fontsize=10)
    fig.tight_layout()
    return fig, label


# --------------------------------------------------------------------------------------------------
# UMONS co-attention maps (Chapter 4)
# --------------------------------------------------------------------------------------------------
def coattention_maps(model, batch: dict, device="cpu") -> tuple[str, list[torch.Tensor]]:
    """Co-attention maps of every layer of a joint UMONS model on ``batch`` (Delbrouck et al. 2020, Sec. 3).

    Returns ``(modality, maps)``: the co-attending modality shown (audio when present, else the first
    one) and per layer a (B, heads, T_frames, T_words) tensor; row t of a map is where frame t looks
    among the words (it sums to 1 over the real words)."""
    model.eval()
    with torch.no_grad():
        model(to_device(batch, device))
    maps = model.attention_maps()["coattention"]
    modality = "A" if "A" in maps else next(iter(maps))
    return modality, maps[modality]


def draw_coattention(ax, maps: Sequence[torch.Tensor], batch: dict, idx: int, layer: int, words: Sequence[str],
                     modality: str = "A", title: str = ""):
    """Heatmap of one utterance's co-attention at ``layer`` (heads averaged; real frames x real words)."""
    import seaborn as sns  # local: seaborn costs ~1.5 s to import; only this plot uses it

    key = {"A": "audio_mask", "V": "video_mask"}[modality]
    t_l = int(batch["text_mask"][idx].sum())
    t_y = int(batch[key][idx].sum())
    w = maps[layer][idx].mean(0)[:t_y, :t_l].numpy()  # (real frames, real words)
    words = list(words)[:t_l]
    sns.heatmap(w, ax=ax, cmap="viridis", xticklabels=words if words else "auto", yticklabels=5,
                cbar_kws={"label": "attention weight"})
    frame = {"A": "audio", "V": "video"}[modality]
    ax.set(xlabel="word (key)", ylabel=f"{frame} frame (query)", title=title)


def draw_lift_by_epoch(table: pd.DataFrame, what: str = "attention", fig=None):
    """Lift on the cue regions against training epochs (Chapter 6), one panel per modality, one line per
    layer, with the bootstrap interval of every point as a band; the dashed line is chance (1).
    ``table``: :attr:`LiftTracker.table`."""
    import matplotlib.pyplot as plt  # local: pyplot costs ~0.5 s; the sweep CLI imports this module and draws nothing
    from matplotlib.ticker import MaxNLocator

    mods = sorted(table["modality"].unique())
    if fig is None:
        fig = plt.figure(figsize=(5.2 * len(mods), 3.4))
    axes = fig.subplots(1, len(mods), squeeze=False)[0]
    for ax, m in zip(axes, mods):
        for layer, g in table[table["modality"] == m].groupby("layer"):
            g = g.sort_values("epoch")
            line, = ax.plot(g["epoch"], g[f"{what}_lift"], marker="o", label=f"layer {layer}")
            ax.fill_between(g["epoch"], g[f"{what}_lift_low"], g[f"{what}_lift_high"], alpha=0.18,
                            color=line.get_color())
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set(xlabel="epoch (0 = untrained)", ylabel=f"{what} lift on the cue regions",
               title={"V": "faces (V)", "A": "mel pieces (A)"}.get(m, m))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# What Chapter 6 can analyse on a given corpus
# ---------------------------------------------------------------------------------------------
def _and(items: list) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


#: What Chapter 6 can train beside MESM (its ``compare`` parameter): FE2E, the reference code's fixed
#: attention (``attention_grad="none"``) and MESM with the authors' block-1 site-order bug.
COMPARISONS = ("FE2E", "fixed attention", "site-order bug")
#: What Chapter 6 can analyse (its ``analyses`` parameter): the trained model (top_p sweep, attention maps,
#: cue-region lifts, kept sites, step profile), the lift after every epoch, the static top_p explorer.
ANALYSES = ("trained model", "lift by epoch", "explorer")


@dataclass(frozen=True)
class AnalysisPlan:
    """Which of Chapter 6's trainings and analyses run (:func:`analysis_plan`); ``skipped`` is the one
    sentence that says which were skipped for want of cue ground truth, and why ("" when none was)."""

    sweep: bool
    maps: bool
    kept_sites: bool
    cue_lifts: bool
    lift_by_epoch: bool
    attention_grad: bool
    attention_grad_lifts: bool
    fe2e: bool = False
    bug_cost: bool = False
    explorer: bool = False
    skipped: str = ""

    @property
    def seed_runs(self) -> bool:
        """Whether the seed runs have anything to decide: a comparison, or the trained model's lifts."""
        return self.fe2e or self.attention_grad or self.bug_cost or self.sweep


def _names(values, known: tuple, parameter: str) -> set:
    values = set(values)
    unknown = sorted(values - set(known))
    if unknown:
        raise ValueError(f"parameter {parameter!r}: unknown {unknown}, expected some of {list(known)}")
    return values


def analysis_plan(test_set, *, analyses=ANALYSES, compare=COMPARISONS) -> AnalysisPlan:
    """Chapter 6's trainings and analyses on the corpus of ``test_set`` (a MESM dataset or its raw split),
    given the chapter's ``analyses`` (some of :data:`ANALYSES`) and ``compare`` (some of
    :data:`COMPARISONS`). The ``top_p`` sweep, attention maps and kept sites need only the trained
    model; the cue-region measures (lift table, verdicts and bar plot, lift by epoch, the lifts of the
    fixed-attention pair) need ``cue.pkl`` in every test utterance folder, which only the synthetic
    corpus writes. On real data those are skipped -- no switch to turn off -- and ``skipped`` names them."""
    analyses, compare = _names(analyses, ANALYSES, "analyses"), _names(compare, COMPARISONS, "compare")
    analysis, by_epoch = "trained model" in analyses, "lift by epoch" in analyses
    fixed = "fixed attention" in compare
    raw = getattr(test_set, "raw", test_set)
    lacking = sum(not (Path(f) / "cue.pkl").is_file() for f in raw.folders)
    cues = lacking == 0
    plan = dict(sweep=analysis, maps=analysis, kept_sites=analysis, cue_lifts=analysis and cues,
                lift_by_epoch=by_epoch and cues, attention_grad=fixed, attention_grad_lifts=fixed and cues,
                fe2e="FE2E" in compare, bug_cost="site-order bug" in compare, explorer="explorer" in analyses)
    dropped = [name for wanted, name in (
        (analysis, "the cue-region lift table with its verdicts and bar plot"),
        (by_epoch, "the lift by epoch"),
        (fixed, "the cue lifts of the attention_grad pair")) if wanted and not cues]
    skipped = ""
    if dropped:
        kept = ["training", "test"] + (["the top_p sweep", "the attention maps", "the kept sites"] if analysis
                                       else []) + (["the attention_grad comparison"] if fixed else [])
        skipped = (f"No cue ground truth here ({lacking} of {len(raw.folders)} test utterances have no cue.pkl, "
                   f"which only the synthetic corpus writes), so the cells that need it are skipped "
                   f"({_and(dropped)}), while {_and(kept)} run as usual.")
    return AnalysisPlan(**plan, skipped=skipped)
