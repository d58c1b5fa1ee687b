"""Evaluation: FID, sFID, Inception Score, precision and recall computed the way the ADM evaluator computes them
(Dhariwal & Nichol 2021, the suite behind the FID 1.42 of REPA and 1.36 of REG), in PyTorch, without TensorFlow;
and the alignment analysis of the REPA paper (§3: per-block linear probe and CKNNA).

    python evaluate.py alignment --ckpt results/smoke-repa/checkpoints/0000400.pt --t 0.5
        per SiT block: linear-probe accuracy of the token-averaged hidden state, and CKNNA between it and the
        target encoder's features (REPA §3, Fig. 2); prints a table, writes a PNG plot
    python evaluate.py toy-experiment ...   the toy SiT vs REPA vs REG experiment, now `python toy.py experiment ...`

    cknna(feats_a, feats_b, topk)   mutual k-NN kernel alignment (Huh et al. 2024, the Platonic Representation
                                    Hypothesis), with the unbiased HSIC of Song et al. 2012
    linear_probe(...)               held-out accuracy of a trained linear classifier (several feature sets at once)

    python evaluate.py SAMPLE.npz REF.npz [--inception pt_inception-2015-12-05-6726825d.pth]
    torchrun --nproc_per_node=8 evaluate.py SAMPLE.npz REF.npz                  (the images split over GPUs)

SAMPLE.npz: `arr_0` uint8 [N, H, W, 3] (what sample.py writes); REF.npz: an ADM reference batch (`arr_0` plus the
stored statistics `mu`, `sigma`, `mu_s`, `sigma_s`), e.g. VIRTUAL_imagenet256_labeled.npz. Features come from the
2015 TF Inception graph (inception.py): pool_3 [N, 2048] and the spatial mixed_6/conv feature [N, 2023].

    frechet_distance   d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))       (FID on pool_3,
                       Heusel et al. 2017; sFID on the spatial feature, Nash et al. 2021)
    inception_score    IS = exp(E_x KL(p(y|x) || p(y))), the mean over splits of 5,000     (Salimans et al. 2016)
    precision_recall   k-NN manifolds (Kynkaanniemi et al. 2019): precision = share of fake samples within the
                       k-th-neighbour radius of some real sample; recall = share of real samples within the radius
                       of some fake sample; squared Euclidean distances, k = 3

Where ADM's statistics come from: FID / sFID use the reference's stored mu / sigma when it has them (and the
sample's, if it has any); IS, precision and recall always use the activations. Activations and statistics of
every .npz are cached next to it (`X.inception.npz`), so scoring one sample set against a second reference, or a
second sample set against the same reference, does not run the network again.

How the figures can differ from ADM's (all far below the precision the papers print):
- float32 convolutions in PyTorch instead of TensorFlow's kernels (rounding-level differences in the activations);
- the matrix square root: tr((S_1 S_2)^(1/2)) from a Cholesky factor and a symmetric eigendecomposition (see
  frechet_distance); ADM's scipy.linalg.sqrtm route is `--sqrtm scipy` (needs scipy);
- precision / recall: float32 distances; ADM computes them in float16 (float32 if a block overflows): `--pr-fp16`;
- the sample mean in float64 (ADM: float32) and softmax / IS in float64 (ADM: float32, where a probability that
  underflows to 0 makes its IS NaN; here 0 log 0 = 0).
"""
import io
import json
import os
import struct
import sys
import time
import zipfile
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import encoders
import toy_experiment
import toy_world
from frechet import (_check_gaussian, _trace_sqrt_product_eigh, _trace_sqrt_product_scipy,  # noqa: F401
                     frechet_distance, gaussian_statistics)
from inception import WEIGHTS_NAME, WEIGHTS_SHA256_PREFIX, load_inception
from losses import interpolant
from model import build_model, load_checkpoint
from plumbing import (ArgumentParser, Progress, UsageError, check_number, check_output_file, run_script, set_tf32,
                      setup_distributed, show_defaults, write_atomic)
from toy_experiment import experiment_main as toy_experiment_main  # `evaluate.py toy-experiment`: now `toy.py experiment`

POOL_DIM, SPATIAL_DIM = 2048, 2023
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# FID family: the metrics (numpy in, float out)
# ----------------------------------------------------------------------------------------------------------------

def inception_score(probs, split_size=5000):
    """IS = exp(E_x KL(p(y|x) || p(y))) on consecutive splits of `split_size` rows (the last one may be shorter),
    averaged over the splits, as ADM. probs: [N, C] class probabilities; p(y) is the split's mean. Terms with
    p(y|x) = 0 contribute 0 (the limit of p log p); ADM's float32 code would return NaN there."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise UsageError(f"inception_score needs probabilities [N, C]; got shape {p.shape}")
    if split_size < 1:
        raise UsageError(f"split_size must be positive, got {split_size}")
    scores = []
    for start in range(0, len(p), split_size):  # ~10 splits: a loop over splits, not over samples
        part = p[start:start + split_size]
        marginal = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _sq_distances(a, b, fp16=False):
    """Pairwise squared Euclidean distances max(|a|^2 - 2 a b^T + |b|^2, 0) in float32. fp16: computed in
    float16 as ADM's TF graph does, recomputed in float32 when a value overflows."""
    if fp16:
        ah, bh = a.half(), b.half()
        d = ((ah * ah).sum(1, keepdim=True) - 2 * (ah @ bh.T) + (bh * bh).sum(1)).clamp_min(0)
        if torch.isfinite(d).all():
            return d.float()
    return ((a * a).sum(1, keepdim=True) - 2 * (a @ b.T) + (b * b).sum(1)).clamp_min(0)


def _block_rows(n_cols, block_size):
    """Rows of a distance block: block_size if given, else ~256 MB of float32 distances."""
    return block_size or max(1, min(10000, (1 << 26) // max(n_cols, 1)))


def knn_radii(features, k=3, fp16=False, block_size=None):
    """Radius of each sample's k-NN ball: its k-th smallest squared distance to the other samples. The row of
    distances includes the sample itself (distance 0), so the radius is the (k+1)-th smallest entry, as ADM."""
    n = len(features)
    rows = _block_rows(n, block_size)
    return torch.cat([torch.kthvalue(_sq_distances(features[i:i + rows], features, fp16), k + 1, dim=1).values
                      for i in range(0, n, rows)])


def precision_recall(real_features, fake_features, k=3, fp16=False, block_size=None, device=None):
    """Improved precision and recall (Kynkaanniemi et al. 2019), ADM's k-NN manifold estimate. With d the squared
    Euclidean distance and r_k(x) the distance from x to its k-th nearest neighbour in its own set:

        precision = mean over fake g of [ exists real x: d(g, x) <= r_k(x) ]
        recall    = mean over real x of [ exists fake g: d(x, g) <= r_k(g) ]

    real_features [N_r, D], fake_features [N_f, D] (numpy). The distances are computed block by block
    (block_size rows at a time, default ~256 MB); each pair is compared once, so the result does not depend on
    the blocking. Returns (precision, recall) as floats."""
    real, fake = (np.asarray(x) for x in (real_features, fake_features))
    for name, x in (("real_features", real), ("fake_features", fake)):
        if x.ndim != 2 or len(x) < k + 1:
            raise UsageError(f"{name}: need [N, D] with N >= k + 1 = {k + 1} for the k-NN radii; got {x.shape}")
    if real.shape[1] != fake.shape[1]:
        raise UsageError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    real = torch.as_tensor(real, dtype=torch.float32, device=device)
    fake = torch.as_tensor(fake, dtype=torch.float32, device=device)
    radii_real, radii_fake = knn_radii(real, k, fp16, block_size), knn_radii(fake, k, fp16, block_size)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    rows = _block_rows(len(fake), block_size)
    for i in range(0, len(real), rows):
        d = _sq_distances(real[i:i + rows], fake, fp16)  # [rows, N_f]
        real_in_fake[i:i + rows] = (d <= radii_fake).any(1)
        fake_in_real |= (d <= radii_real[i:i + rows, None]).any(0)
    return fake_in_real.double().mean().item(), real_in_fake.double().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# Reading .npz batches
# ----------------------------------------------------------------------------------------------------------------

def _npz(path):
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UsageError(f"{path} is not an .npz file ({e}); expected np.savez output with arr_0 = uint8 images "
                        "[N, H, W, 3]") from None


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        return None
    return read(f)


def read_images(path):
    """The images `arr_0` of an .npz as uint8 [N, H, W, 3], memory-mapped when the file stores it uncompressed
    (np.savez, as sample.py and ADM write them), so that no process holds all of them in memory. Anything else
    (another dtype, NCHW, grey or RGBA images) is refused with what to do."""
    with _npz(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            raise UsageError(f"{path} has no arr_0 (it holds {[n[:-4] for n in zf.namelist()]}); expected "
                            "arr_0 = uint8 images [N, H, W, 3] (np.savez(path, images))")
        info = zf.getinfo("arr_0.npy")
        with zf.open(info) as f:
            header = _npy_header(f)
            npy_header_len = f.tell()
    if header is None:
        arr = np.load(path)["arr_0"]
        shape, fortran, dtype = arr.shape, False, arr.dtype
    else:
        (shape, fortran, dtype), arr = header, None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        hint = ""
        if len(shape) == 4 and shape[1] == 3 and shape[3] != 3:
            hint = " It looks like NCHW: store images.transpose(0, 2, 3, 1)."
        elif dtype != np.uint8:
            hint = " Convert [0, 1] or [-1, 1] floats with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) (or " \
                   "(x + 1) * 127.5 for [-1, 1])."
        raise UsageError(f"{path}: arr_0 is {np.dtype(dtype).name} {list(shape)}; expected uint8 RGB images "
                        f"[N, H, W, 3] (NHWC, 0..255).{hint}")
    if arr is not None:
        return arr
    if fortran or info.compress_type != zipfile.ZIP_STORED:  # compressed (np.savez_compressed): read it whole
        return np.load(path)["arr_0"]
    with open(path, "rb") as f:  # the member's data starts after its local header: 30 bytes + name + extra field
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + 30 + name_len + extra_len + npy_header_len
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=tuple(shape))


def read_stored_statistics(path):
    """The statistics an ADM reference batch stores, {'pool': (mu, sigma), 'spatial': (mu_s, sigma_s)}; the
    entries it does not have are missing. Shapes are checked: 2048 / 2023 features."""
    out, names = {}, {"pool": ("mu", "sigma", POOL_DIM), "spatial": ("mu_s", "sigma_s", SPATIAL_DIM)}
    with np.load(path) as npz:
        for key, (m, s, dim) in names.items():
            if m in npz.files and s in npz.files:
                mu, sigma = npz[m], npz[s]
                if mu.shape != (dim,) or sigma.shape != (dim, dim):
                    raise UsageError(f"{path}: stored {m} {list(mu.shape)} / {s} {list(sigma.shape)}; the ADM "
                                    f"reference format has [{dim}] / [{dim}, {dim}]")
                out[key] = (mu, sigma)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Activations (sharded over torchrun ranks) and their cache
# ----------------------------------------------------------------------------------------------------------------

def inception_activations(model, images, batch_size=100, device="cpu", rank=0, world=1, label="images"):
    """pool_3 [N, 2048] and spatial [N, 2023] activations (float32 numpy) of uint8 images [N, H, W, 3]. Under
    torchrun each rank runs a contiguous slice and rank 0 receives all (other ranks return None). Rank 0 prints
    a progress line with images/s and ETA (every batch on a terminal, every 30 s in a log)."""
    n = len(images)
    lo, hi = n * rank // world, n * (rank + 1) // world
    pools, spatials = [], []
    progress = Progress(n, prefix=f"{label}: ", world=world, quiet=rank != 0, stream=sys.stdout)
    for start in range(lo, hi, batch_size):
        batch = torch.from_numpy(np.array(images[start:min(start + batch_size, hi)]))  # a copy off the memmap
        with torch.no_grad():  # NHWC uint8 -> NCHW view in channels_last memory, which the convolutions prefer
            pool, spatial = model(batch.to(device).permute(0, 3, 1, 2))
        pools.append(pool.float().cpu().numpy())
        spatials.append(spatial.float().cpu().numpy())
        progress.update(len(batch))
    progress.close()
    pool = np.concatenate(pools) if pools else np.zeros((0, POOL_DIM), np.float32)
    spatial = np.concatenate(spatials) if spatials else np.zeros((0, SPATIAL_DIM), np.float32)
    if world == 1:
        return pool, spatial
    parts = [None] * world if rank == 0 else None
    dist.gather_object((pool, spatial), parts, dst=0)
    if rank != 0:
        return None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cache_path(path):
    """X.npz -> X.inception.npz, next to the batch it describes."""
    return (path[:-4] if path.endswith(".npz") else path) + ".inception.npz"


def _cache_key(path, weights_sha256):
    st = os.stat(path)
    return json.dumps(dict(version=CACHE_VERSION, size=st.st_size, mtime_ns=st.st_mtime_ns,
                           weights_sha256=weights_sha256), sort_keys=True)


def load_cached(path, weights_sha256):
    """The cached {'pool', 'mu', 'sigma', 'mu_s', 'sigma_s'} of `path`, or None when there is no cache or it was
    made from another version of the file (size / mtime) or with other weights."""
    cpath = cache_path(path)
    if weights_sha256 is None or not os.path.isfile(cpath):
        return None
    try:
        with np.load(cpath) as c:
            if str(c["key"]) != _cache_key(path, weights_sha256):
                return None
            return {k: c[k] for k in ("pool", "mu", "sigma", "mu_s", "sigma_s")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def save_cache(path, weights_sha256, acts):
    """Write the cache atomically; a read-only folder only costs the speed-up (a warning, not an error)."""
    if weights_sha256 is None:
        return
    buf = io.BytesIO()
    np.savez(buf, key=np.array(_cache_key(path, weights_sha256)), **acts)
    try:
        write_atomic(cache_path(path), buf.getbuffer())
    except (OSError, ValueError) as e:
        print(f"warning: could not cache the activations of {path} ({e}); the next run recomputes them",
              flush=True)


def batch_activations(path, images, model, weights_sha256, args, rank, world, device, label):
    """Activations and statistics of one .npz (from its cache when valid), on rank 0; None on other ranks."""
    cached = load_cached(path, weights_sha256) if not args.no_cache else None
    if cached is not None:
        if rank == 0:
            print(f"{label}: activations of {path} from {cache_path(path)}", flush=True)
        return cached if rank == 0 else None
    out = inception_activations(model, images, args.batch_size, device, rank, world, label)
    if rank != 0:
        return None
    pool, spatial = out
    acts = dict(pool=pool)
    acts["mu"], acts["sigma"] = gaussian_statistics(pool)
    acts["mu_s"], acts["sigma_s"] = gaussian_statistics(spatial)
    if not args.no_cache:
        save_cache(path, weights_sha256, acts)
    return acts


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = ArgumentParser(prog="evaluate.py", allow_abbrev=False,
                       description="FID, sFID, Inception Score, precision and recall of SAMPLE.npz against "
                                   "an ADM reference batch REF.npz, computed as the ADM evaluator does. "
                                   "Other commands: `evaluate.py alignment ...`, `evaluate.py "
                                   "toy-experiment ...`.")
    p.add_argument("sample", nargs="?", help="sample batch: .npz with arr_0 = uint8 [N, H, W, 3] (sample.py)")
    p.add_argument("ref", nargs="?", help="reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--inception", default=None,
                   help=f"weight file {WEIGHTS_NAME} (default: ./{WEIGHTS_NAME}, then torch.hub's checkpoint "
                        "folder); 'random' for speed tests only")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass and process")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of precision / recall")
    p.add_argument("--split-size", type=int, default=5000, help="Inception Score split size")
    p.add_argument("--sqrtm", default="eigh", choices=["eigh", "scipy"],
                   help="tr((S1 S2)^1/2) by a Cholesky factor and symmetric eigenvalues, or by ADM's "
                        "scipy.linalg.sqrtm (needs scipy)")
    p.add_argument("--pr-fp16", action="store_true",
                   help="precision / recall distances in float16, as ADM's TF graph (default float32)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write X.inception.npz caches")
    p.add_argument("--benchmark", type=int, default=None, metavar="N",
                   help="time the network on N random 256x256 images and print images/s (no files needed; "
                        "random weights unless --inception is given)")
    args = show_defaults(p).parse_args(argv)
    for name in ("batch_size", "k", "split_size", "benchmark"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def _check_batches(args, sample, ref):
    """Refuse what ADM would silently mis-score: other resolutions, too few samples, swapped arguments."""
    if sample.shape[1:3] != ref.shape[1:3]:
        raise UsageError(f"{args.sample} holds {sample.shape[1]}x{sample.shape[2]} images but {args.ref} is a "
                        f"{ref.shape[1]}x{ref.shape[2]} reference batch; score against the reference batch of the "
                        "sample resolution (e.g. VIRTUAL_imagenet512.npz for 512x512 samples)")
    need = max(2, args.k + 1)
    for path, arr in ((args.sample, sample), (args.ref, ref)):
        if len(arr) < need:
            raise UsageError(f"{path} holds {len(arr)} images; the statistics need at least {need} (2 for a "
                            f"covariance, k + 1 = {args.k + 1} for the k-NN radii). The papers use 50,000 samples")
    if read_stored_statistics(args.sample) and not read_stored_statistics(args.ref):
        raise UsageError(f"{args.sample} holds reference statistics (mu, sigma) and {args.ref} does not: the "
                        "arguments look swapped. This script takes SAMPLE REF (ADM's evaluator.py takes REF SAMPLE)")


def run_benchmark(args, rank, world, device):
    model, sha = load_inception(args.inception or "random", device)
    model = model.to(memory_format=torch.channels_last)
    images = np.random.default_rng(0).integers(0, 256, (args.benchmark, 256, 256, 3), dtype=np.uint8)
    with torch.no_grad():  # warm-up: one-time initialisation stays out of the timing
        model(torch.from_numpy(images[:2]).to(device).permute(0, 3, 1, 2))
    t0 = time.time()
    inception_activations(model, images, args.batch_size, device, rank, world, "benchmark")
    rate = args.benchmark / (time.time() - t0)
    if rank == 0:
        print(json.dumps(dict(benchmark_images=args.benchmark, images_per_s=round(rate, 2), device=str(device),
                              world_size=world, batch_size=args.batch_size, threads=torch.get_num_threads(),
                              weights="random" if sha is None else sha)), flush=True)
    return dict(images_per_s=rate)


def run_fid(args, rank, world, device):
    sample, ref = read_images(args.sample), read_images(args.ref)
    _check_batches(args, sample, ref)
    model, sha = load_inception(args.inception, device)
    model = model.to(memory_format=torch.channels_last)
    if rank == 0:
        if sha is None:
            print("warning: random Inception weights: the figures below are meaningless", flush=True)
        elif not sha.startswith(WEIGHTS_SHA256_PREFIX):
            print(f"warning: the weight file's SHA-256 {sha[:16]}... does not start with {WEIGHTS_SHA256_PREFIX} "
                  f"(the published {WEIGHTS_NAME}); figures are not comparable with the papers'", flush=True)
        if len(sample) <= POOL_DIM:
            print(f"warning: {len(sample)} samples <= {POOL_DIM} features: the covariance is singular and FID is "
                  "biased upwards; the papers use 50,000 samples", flush=True)
    s_acts = batch_activations(args.sample, sample, model, sha, args, rank, world, device, "sample")
    r_acts = batch_activations(args.ref, ref, model, sha, args, rank, world, device, "reference")
    if rank != 0:
        return None
    # ADM: FID / sFID from a file's stored statistics when it has them, else from its activations.
    stats = {}
    for name, path, acts in (("sample", args.sample, s_acts), ("ref", args.ref, r_acts)):
        stored = read_stored_statistics(path)
        stats[name] = {"pool": stored.get("pool", (acts["mu"], acts["sigma"])),
                       "spatial": stored.get("spatial", (acts["mu_s"], acts["sigma_s"]))}
        if stored:
            print(f"{path}: using its stored statistics ({', '.join(sorted(stored))})", flush=True)
    t0 = time.time()
    fid = frechet_distance(*stats["sample"]["pool"], *stats["ref"]["pool"], sqrtm=args.sqrtm)
    sfid = frechet_distance(*stats["sample"]["spatial"], *stats["ref"]["spatial"], sqrtm=args.sqrtm)
    with torch.no_grad():
        logits = model.logits(torch.as_tensor(s_acts["pool"], device=device))
        probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
    isc = inception_score(probs, args.split_size)
    prec, rec = precision_recall(r_acts["pool"], s_acts["pool"], k=args.k, fp16=args.pr_fp16, device=device)
    metrics = dict(inception_score=isc, fid=fid, sfid=sfid, precision=prec, recall=rec)
    print(f"Inception Score: {isc}\nFID: {fid}\nsFID: {sfid}\nPrecision: {prec}\nRecall: {rec}", flush=True)
    print(json.dumps(dict(sample=args.sample, ref=args.ref, num_samples=len(sample), num_ref=len(ref), **metrics,
                          inception_weights_sha256=sha, seconds_metrics=round(time.time() - t0, 1),
                          sqrtm=args.sqrtm, pr_fp16=args.pr_fp16)), flush=True)
    return metrics


def fid_main(argv):
    """`evaluate.py SAMPLE REF`: print the five metrics and a JSON line; returns the metrics dict (rank 0)."""
    args = parse_args(argv)
    if args.benchmark is None and (args.sample is None or args.ref is None):
        raise UsageError("usage: evaluate.py SAMPLE.npz REF.npz (or --benchmark N); see --help")
    rank, world, device = setup_distributed(args.device, timeout=timedelta(hours=2))
    set_tf32(False)  # full float32 convolutions and matmuls, as the TF graph on which ADM's figures were made
    try:
        return (run_benchmark if args.benchmark else run_fid)(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------------
# CKNNA and the linear probe
# ------------------------------------------------------------------------------------------------------------------


def hsic_unbiased(K, L):
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5) of two n x n kernel matrices, n > 3:

        K~, L~ = K, L with zero diagonals
        HSIC = 1 / (n (n - 3)) [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n - 1)(n - 2)) - 2 / (n - 2) 1^T K~ L~ 1 ]
    """
    n = K.shape[0]
    K = K.clone().fill_diagonal_(0)
    L = L.clone().fill_diagonal_(0)
    trace = (K * L.T).sum()
    ones = K.sum() * L.sum() / ((n - 1) * (n - 2))
    cross = (K.sum(0) * L.sum(1)).sum() * 2 / (n - 2)  # 1^T K L 1 = sum_j (column sums of K)_j (row sums of L)_j
    return (trace + ones - cross) / (n * (n - 3))


def _mutual_knn_alignment(K, L, topk):
    """HSIC of the kernels restricted to mutual neighbours: mask_ij = [j in kNN_K(i)] [j in kNN_L(i)], self excluded."""
    n = K.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=K.device)
    def knn_mask(M):
        idx = M.masked_fill(eye, float("-inf")).topk(topk, dim=1).indices  # largest similarity = nearest
        return torch.zeros_like(M).scatter_(1, idx, 1.0)
    mask = knn_mask(K) * knn_mask(L)
    return hsic_unbiased(mask * K, mask * L)


def cknna(feats_a, feats_b, topk=10):
    """CKNNA, the mutual k-nearest-neighbour kernel alignment of Huh et al. 2024 (used in REPA §3):

        K = A A^T, L = B B^T                          linear kernels of the inputs as given (n samples each)
        m_ij = 1[j in topk_K(i)] 1[j in topk_L(i)]     top-k neighbours of each row, excluding itself
        align(K, L) = HSIC_unbiased(m * K, m * L)     (the mask m of the pair (K, L))
        CKNNA = align(K, L) / (sqrt(align(K, K) align(L, L)) + 1e-6)

    feats_a [n, d_a], feats_b [n, d_b]: row i of both describes the same sample. 1 for identical representations,
    ~0 for unrelated ones. Returns a float.
    """
    a, b = torch.as_tensor(feats_a), torch.as_tensor(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"cknna needs two [n, d] feature matrices with the same n (one row per sample), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    if not 1 <= topk < n - 1 or n < 4:
        raise ValueError(f"cknna: topk={topk} must be in 1..n-2 for n={n} samples (each row has n-1 neighbours "
                         f"besides itself); lower topk or pass more samples")
    K, L = (x.double() @ x.double().T for x in (a, b))
    kl = _mutual_knn_alignment(K, L, topk)
    kk = _mutual_knn_alignment(K, K, topk)
    ll = _mutual_knn_alignment(L, L, topk)
    return (kl / (torch.sqrt(kk * ll) + 1e-6)).item()


def linear_probe(train_x, train_y, test_x, test_y, num_classes=None, steps=300, lr=0.05, weight_decay=1e-4):
    """Held-out accuracy of a linear classifier  p(y | x) = softmax(W x~ + b)  trained on (train_x, train_y).

    x~ = (x - mean) / std with the training split's statistics; W, b minimize the cross-entropy + weight_decay
    ||W||^2 by full-batch Adam. Features may carry a leading dimension (e.g. one feature set per SiT block,
    [B, n, d]): each set gets its own classifier, all trained at once. Returns a float, or a list of B floats.
    """
    tx, vx = torch.as_tensor(train_x).float(), torch.as_tensor(test_x).float()
    ty, vy = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    single = tx.ndim == 2
    tx, vx = (tx[None], vx[None]) if single else (tx, vx)
    if tx.ndim != 3 or vx.shape[0] != tx.shape[0] or vx.shape[-1] != tx.shape[-1] or tx.shape[1] != len(ty) \
            or vx.shape[1] != len(vy):
        raise ValueError(f"linear_probe: features [n, d] (or [B, n, d]) with one label per row, got train "
                         f"{tuple(tx.shape)} / {len(ty)} labels and test {tuple(vx.shape)} / {len(vy)} labels")
    c = num_classes or int(max(ty.max(), vy.max())) + 1
    mean, std = tx.mean(1, keepdim=True), tx.std(1, keepdim=True) + 1e-6
    tx, vx = (tx - mean) / std, (vx - mean) / std
    W = torch.zeros(tx.shape[0], tx.shape[-1], c, requires_grad=True)
    b = torch.zeros(tx.shape[0], 1, c, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = tx @ W + b  # [B, n, c]
            # sum over the B independent classifiers: each one's gradient is its own loss's
            loss = F.cross_entropy(logits.flatten(0, 1), ty.repeat(tx.shape[0]), reduction="sum") / len(ty) \
                + weight_decay * W.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = ((vx @ W + b).argmax(-1) == vy).float().mean(1).tolist()
    return acc[0] if single else acc


# ------------------------------------------------------------------------------------------------------------------
# Alignment analysis of a toy checkpoint
# ------------------------------------------------------------------------------------------------------------------


def load_toy_model(path):
    """(EMA SiT, training args) of a toy checkpoint written by train.py; anything else is refused clearly."""
    try:
        sd, args = load_checkpoint(path)
        model, _ = build_model(sd, args)
    except (OSError, ValueError) as e:
        raise UsageError(f"--ckpt {path}: {e}") from None
    if not args or args.get("data_dir") != "toy":
        what = "a released ImageNet model" if not args else f"a model trained on --data-dir {args.get('data_dir')}"
        raise UsageError(f"--ckpt {path} is {what}; the alignment analysis needs a SiT trained on the toy set by "
                         "train.py (e.g. results/smoke-repa/checkpoints/0000400.pt from `python train.py --smoke repa`)")
    return model, args


@torch.no_grad()
def block_features(model, x, t, y, cls=None):
    """Token-averaged hidden state after every SiT block for x_t = alpha_t x + sigma_t eps (given eps in x):
    a list of [N, hidden] tensors, one per block. REG's class token (token 0) is left out of the average, so that
    all methods are compared on their image tokens."""
    feats = []
    hooks = [b.register_forward_hook(lambda m, i, out: feats.append(out[:, -model.grid_size ** 2:].mean(1)))
             for b in model.blocks]
    try:
        model(x, torch.full((len(x),), float(t)), y, cls=cls)
    finally:
        for h in hooks:
            h.remove()
    return feats


def alignment_analysis(model, train_args, t=0.5, num_samples=1200, topk=10, seed=0, enc_type="toy-vit",
                       batch_size=200):
    """Per block: linear-probe accuracy (12 toy classes; 2/3 train, 1/3 held out) of the token-averaged hidden
    state, and CKNNA between it and the target encoder's token-averaged patch features (both L2-normalized), and
    the held-out R^2 of a ridge probe of the shape's area (the fraction of the image it covers: what the label does
    not say on the 'sizes' toy set) from the same hidden state.

    Inputs: real toy images (a seed of their own) noised to time t, fed with the *null* label, so that the probe
    reads what the network extracts from the image, not its label embedding. A REG model gets its class token
    noised to the same t (its training input).
    Returns {'probe': [...], 'cknna': [...], 'area_r2': [...], 'encoder_probe': float}.
    """
    if not 0 <= t <= 1:
        raise UsageError(f"--t {t} must be in [0, 1] (0 = clean data, 1 = pure noise)")
    res = int(train_args["resolution"])
    style = train_args.get("toy_style") or toy_world.TOY_STYLE  # runs before --toy-style existed: the default style
    toy_world.ensure_toy_encoder(enc_type, model.grid_size, style=style)  # trained once, then cached
    enc = encoders.load_encoders(enc_type, "cpu", resolution=res, grid_size=model.grid_size, toy_style=style)[0]
    images, labels, geometry = map(torch.from_numpy, toy_world.toy_images_with_geometry(
        np.arange(num_samples), res, seed + 424242, style, res // model.grid_size))
    area = geometry[..., 2].mean(1, keepdim=True)  # [N, 1], the fraction of each image its shape covers
    g = torch.Generator().manual_seed(seed)
    alpha, sigma, _, _ = (float(c) for c in interpolant(torch.tensor(float(t)), train_args.get("path_type", "linear")))
    hidden, target = [], []
    for i in range(0, num_samples, batch_size):
        img = images[i:i + batch_size]
        x = img.float() * (2 / 255) - 1  # pixel-space toy data: latent = image in [-1, 1] (latent_scale 1)
        x_t = alpha * x + sigma * torch.randn(x.shape, generator=g)
        cls_feat, patches = enc(img)
        cls = None
        if model.cls_dim is not None:
            cls = alpha * cls_feat + sigma * torch.randn(cls_feat.shape, generator=g)
        null = torch.full((len(img),), model.num_classes)
        hidden.append(torch.stack(block_features(model, x_t, t, null, cls)))  # [depth, n, hidden]
        target.append(patches.mean(1))
    hidden, target = torch.cat(hidden, 1), torch.cat(target)
    n_train = num_samples * 2 // 3
    probe = linear_probe(hidden[:, :n_train], labels[:n_train], hidden[:, n_train:], labels[n_train:],
                         num_classes=toy_world.TOY_NUM_CLASSES)
    enc_probe = linear_probe(target[:n_train], labels[:n_train], target[n_train:], labels[n_train:],
                             num_classes=toy_world.TOY_NUM_CLASSES)
    align = [cknna(F.normalize(h, dim=-1), F.normalize(target, dim=-1), topk) for h in hidden]
    area_r2 = [toy_experiment.ridge_r2(h[:n_train], area[:n_train], h[n_train:], area[n_train:])[0] for h in hidden]
    return {"probe": probe, "cknna": align, "area_r2": area_r2, "encoder_probe": enc_probe}


def alignment_main(argv=None):
    p = ArgumentParser(
        prog="evaluate.py alignment", allow_abbrev=False,
        description="REPA §3 analysis of toy SiT checkpoints: per block, the linear-probe accuracy of the "
                    "token-averaged hidden state at time t and its CKNNA with the target encoder's features.")
    p.add_argument("--ckpt", nargs="+", required=True, help="toy checkpoints of train.py (one or more)")
    p.add_argument("--label", nargs="+", default=None, help="names for the checkpoints (default: their method)")
    p.add_argument("--t", type=float, default=0.5, help="noise level of the inputs (0 = clean, 1 = noise)")
    p.add_argument("--num-samples", type=int, default=1200, help="toy images (2/3 probe training, 1/3 held out)")
    p.add_argument("--topk", type=int, default=10, help="CKNNA neighbours (Huh et al. use 10)")
    p.add_argument("--enc-type", default="toy-vit", help="target encoder to compare with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="alignment.png", help="PNG plot of both curves per checkpoint")
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    check_number("--t", a.t, 0.0, 1.0, what="a number in [0, 1] (0 = clean data, 1 = pure noise)")
    check_number("--num-samples", a.num_samples, 3)
    check_number("--seed", a.seed, 0)
    check_output_file("--plot", a.plot, (".png",))
    if a.json is not None:
        check_output_file("--json", a.json, (".json",))
    missing = [c for c in a.ckpt if not os.path.isfile(c)]
    if missing:
        raise UsageError(f"--ckpt {missing[0]}: no such file")
    if a.label and len(a.label) != len(a.ckpt):
        raise UsageError(f"--label gives {len(a.label)} names for {len(a.ckpt)} checkpoints")
    if not 1 <= a.topk < a.num_samples - 1:
        raise UsageError(f"--topk {a.topk} must be in 1..{a.num_samples - 2} (below --num-samples {a.num_samples} "
                         f"minus 1)")
    results = {}
    for k, path in enumerate(a.ckpt):
        model, args = load_toy_model(path)
        name = a.label[k] if a.label else str(args.get("method", os.path.basename(path)))
        results[name] = alignment_analysis(model, args, a.t, a.num_samples, a.topk, a.seed, a.enc_type)
        r = results[name]
        print(f"{name}  ({path}, t = {a.t}; the target encoder itself probes at {r['encoder_probe']:.3f})")
        print("| block | " + " | ".join(str(i + 1) for i in range(len(r["probe"]))) + " |")
        print("|---|" + "---|" * len(r["probe"]))
        print("| linear probe | " + " | ".join(f"{v:.3f}" for v in r["probe"]) + " |")
        print("| CKNNA | " + " | ".join(f"{v:.3f}" for v in r["cknna"]) + " |")
        print("| shape area, probe R^2 | " + " | ".join(f"{v:.3f}" for v in r["area_r2"]) + " |", flush=True)
    series = []
    for key, label in (("probe", "probe"), ("cknna", "CKNNA")):
        series += [{"label": f"{name} {label}", "x": list(range(1, len(r[key]) + 1)), "y": r[key]}
                   for name, r in results.items()]
    toy_experiment.plot_lines(a.plot, series, title=f"per-block linear probe and CKNNA at t = {a.t}", xlabel="SiT block",
               ylabel="probe accuracy / CKNNA", ylim=(0, 1))
    print(f"wrote {a.plot}")
    if a.json:
        write_atomic(a.json, json.dumps({"t": a.t, "topk": a.topk, "results": results}, indent=1).encode())
    return results


def main(argv=None):
    """Dispatch: `alignment ...` and `toy-experiment ...` to their commands, anything else to fid_main."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"alignment": "alignment_main", "toy-experiment": "toy_experiment_main"}
    if argv and argv[0] in commands:
        fn = globals().get(commands[argv[0]])
        if fn is None:
            raise UsageError(f"`evaluate.py {argv[0]}` is not available in this version of evaluate.py")
        fn(argv[1:])
        return 0  # the exit status for the shell
    return fid_main(argv)


def cli(argv=None):
    """The command line's exit status: 0, or 2 with one line for bad input (or a missing file)."""
    return run_script("evaluate.py", main, argv, also=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(cli())
