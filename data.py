"""Data: ImageNet preprocessing, and the training datasets and batch streams.

Preprocessing (run once):

    python data.py --source ILSVRC/Data/CLS-LOC/train --dest data/imagenet256 --resolution 256

turns an ImageNet-style tree (SOURCE/<class folder>/<image>, class index = the folder's position among all class
folders in sorted order) into the layout the released REPA/REG code reads:

    DEST/images/00000/img00000000.png            center-cropped RGB (ADM crop), uncompressed PNG
    DEST/vae-sd/00000/img-mean-std-00000000.npy  SD-VAE posterior moments cat(mean, std), float32 [8, H/8, W/8]
    DEST/images/dataset.json, DEST/vae-sd/dataset.json   {"labels": [[relative_path, class], ...]}
    DEST/classes.json                            {class folder: class index}

Names and file formats follow the released preprocessing (the EDM2 dataset tool as adapted by REPA), so the
released code can train on our output and we can train on theirs. Unlike the released tool, one pass writes
both images and latents, runs batched on GPU or CPU, splits the work across `torchrun` ranks, skips unreadable
JPEGs, and resumes after a crash. Item i is the i-th file of the sorted source list (sorted full paths, as in
the released tool), so names never depend on how many ranks ran or on where a run was interrupted; a skipped
(unreadable) source image leaves a gap in the numbering.

Training reads that layout with `ImageLatentDataset`, or, with no files at all, `toy_world.ToyDataset` (pixel space);
`ShardSampler` splits it over ranks and `Batches` is the resumable stream of micro-batches train.py draws from.
"""
import argparse
import errno
import io
import json
import os
import re
import sys
from datetime import timedelta

import numpy as np
import torch
from PIL import Image

from encoders import VAE_SCALE  # SD-VAE latent scale; z = (mean + std * eps) * VAE_SCALE
from plumbing import (ArgumentParser, Progress, UsageError, barrier, released_spelling, setup_distributed, show_defaults,
                      write_atomic)
from toy_world import TOY_STYLE, ToyDataset

IMAGE_EXTS = {'.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm', '.gif'}


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------------

def center_crop_arr(pil_image, image_size):
    """ADM center crop (guided-diffusion `center_crop_arr`; EDM2 `--transform=center-crop-dhariwal`).

    while min(W, H) >= 2 * image_size:  (W, H) <- (W // 2, H // 2) with a BOX filter
    scale = image_size / min(W, H);      (W, H) <- (round(W * scale), round(H * scale)) with BICUBIC
    crop image_size x image_size at ((H - image_size) // 2, (W - image_size) // 2).
    Returns uint8 [image_size, image_size, 3]. The halving steps are what the papers' FIDs were measured on:
    one big bicubic resize gives visibly different (sharper) pixels.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def item_paths(index):
    """Relative output paths of item `index`, named like the released tool: 1000 files per folder."""
    s = f'{index:08d}'
    return f'{s[:5]}/img{s}.png', f'{s[:5]}/img-mean-std-{s}.npy'


def list_source_images(source):
    """Sorted image files under `source`, their labels and the class folders (sorted; a label is the index of the
    image's top-level folder in that list). Hidden folders (.name) are skipped."""
    if not os.path.isdir(source):
        raise UsageError(f'--source {source!r} is not a folder; expected an ImageNet-style tree '
                        f'SOURCE/<class>/<image>.JPEG (e.g. ILSVRC/Data/CLS-LOC/train)')
    files = []
    for root, dirs, names in os.walk(source, followlinks=True):
        dirs.sort()
        files += [os.path.join(root, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTS]
    files.sort()  # sorted full paths, as the released tool (decides every item's index and name)
    top = [os.path.relpath(f, source).replace('\\', '/').split('/')[0] for f in files]
    files, top = [f for f, t in zip(files, top) if not t.startswith('.')], [t for t in top if not t.startswith('.')]
    if not files:
        raise UsageError(f'no images found under {source!r} (looked for {", ".join(sorted(IMAGE_EXTS))}); '
                        f'expected SOURCE/<class>/<image>.JPEG')
    loose = [f for f, t in zip(files, top) if t == os.path.basename(f)]
    if loose:
        raise UsageError(f'{len(loose)} images lie directly in {source!r} (e.g. {loose[0]!r}) instead of in a '
                        f'class folder; expected SOURCE/<class>/<image>.JPEG')
    # The class index is the folder's position among ALL class folders, empty ones included (as torchvision's
    # ImageFolder): an empty folder must not shift the labels of the classes after it. Hidden folders are no class.
    classes = sorted(e.name for e in os.scandir(source) if e.is_dir() and not e.name.startswith('.'))
    class_index = {c: i for i, c in enumerate(classes)}
    empty = sorted(set(classes) - set(top))
    if empty:
        print(f'warning: {len(empty)} class folder(s) without images keep their label but get no items: '
              f'{", ".join(empty[:10])}{" ..." if len(empty) > 10 else ""}', file=sys.stderr)
    return files, [class_index[t] for t in top], classes


class _SourceImages(torch.utils.data.Dataset):
    """Decode + ADM-crop + PNG-encode source images (runs in DataLoader workers). Unreadable -> None."""

    def __init__(self, files, resolution, compress_level):
        self.files, self.resolution, self.compress_level = files, resolution, compress_level

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                im = im.convert('RGB')  # forces a full decode: truncated/corrupt files raise here
            arr = np.array(center_crop_arr(im, self.resolution))  # writable, contiguous copy
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            return i, None, None, f'{type(e).__name__}: {e}'
        buf = io.BytesIO()
        # Uncompressed PNG, as the released tool (fast to decode in the training loop; --png-compress-level
        # trades disk space for decode time, the pixels are identical).
        Image.fromarray(arr).save(buf, format='png', compress_level=self.compress_level, optimize=False)
        return i, torch.from_numpy(arr), buf.getvalue(), None


def _collate(items):
    return items


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _scan_done(dest, clean_tmp):
    """Relative paths of finished files under dest/images and dest/vae-sd; optionally delete stale temp files."""
    done = set()
    for sub in ('images', 'vae-sd'):
        top = os.path.join(dest, sub)
        if not os.path.isdir(top):
            continue
        for d in os.scandir(top):
            if not d.is_dir():
                continue
            for e in os.scandir(d.path):
                if e.name.endswith('.tmp'):
                    if clean_tmp:  # left by a killed run: never trusted, never counted
                        os.remove(e.path)
                else:
                    done.add(f'{sub}/{d.name}/{e.name}')
    return done


def _dest_error(dest, e):
    """An OSError while making the output folder, as a UsageError that says what to do."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UsageError(f'no space left on the device for {dest!r}; free some space and rerun.')
    return UsageError(f'cannot write to --dest {dest!r} ({type(e).__name__}: {e.strerror or e}); pass a writable folder')


def _check_classes(dest, classes):
    """DEST/classes.json = {class folder: label}; a rerun whose class folders differ is refused (labels would mix)."""
    path = os.path.join(dest, 'classes.json')
    table = {c: i for i, c in enumerate(classes)}
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if old is not None and old != table:
        raise UsageError(f'{dest!r} was made from other class folders ({len(old)} in its classes.json, {len(table)} '
                        f'now), so the labels would not match; use a new --dest, or the same --source to resume.')
    if old is None:
        write_atomic(path, (json.dumps(table, indent=1) + '\n').encode())


def _check_config(dest, config):
    """Refuse to resume into a folder made with different settings (its files would be trusted as finished)."""
    path = os.path.join(dest, 'preprocess.json')
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old is not None:
            diff = [k for k in config if old.get(k) != config[k]]
            if diff:
                raise UsageError(f'{dest!r} holds output made with other settings ({", ".join(f"{k}: {old.get(k)!r} -> {config[k]!r}" for k in diff)}); '
                                f'use a new --dest, or the same settings to resume.')
            return
    write_atomic(path, (json.dumps(config, indent=1) + '\n').encode())


def preprocess(source, dest, resolution=256, vae='mse', batch_size=64, num_workers=None, device=None,
               max_images=None, png_compress_level=0):
    """ImageNet-style tree -> DEST/{images,vae-sd}/... + dataset.json (see the module docstring).

    vae: a name/path for encoders.load_vae ('ema', 'mse', hub id, local file, 'random') or a module with
    `encode(x in [-1, 1]) -> (mean, std)`. Each rank (under torchrun) takes every world_size-th item. Batches
    are fixed slices of a rank's item list and a partially finished batch is recomputed whole, so a resumed
    run computes every latent in the same batch as an uninterrupted run: the output is byte-identical.
    Returns a dict with counts: total, written, skipped (unreadable sources), already_done.
    """
    if resolution % 8 != 0 or resolution <= 0:
        raise UsageError(f'--resolution must be a positive multiple of 8 (the SD-VAE downsamples by 8), got {resolution}')
    if batch_size < 1:
        raise UsageError(f'--batch-size must be >= 1, got {batch_size}')
    files, labels, classes = list_source_images(source)
    num_source = len(files)
    if max_images is not None:
        files, labels = files[:max_images], labels[:max_images]
    n = len(files)
    if device is not None and torch.device(device).type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {torch.device(device)} asked for, but no CUDA GPU is available; use --device cpu')
    # gloo is only used for barriers; a long timeout since ranks may finish hours apart after a resume.
    rank, world, device = setup_distributed(None if device is None else str(device), timeout=timedelta(days=2),
                                            backend='gloo')
    vae_name = vae if isinstance(vae, str) else type(vae).__name__
    try:  # the output folder first: an unwritable --dest stops before the VAE is loaded
        os.makedirs(os.path.join(dest, 'images'), exist_ok=True)
        os.makedirs(os.path.join(dest, 'vae-sd'), exist_ok=True)
    except OSError as e:
        raise _dest_error(dest, e) from None
    if isinstance(vae, str):
        try:
            from encoders import load_vae
        except ImportError as e:
            raise UsageError(f'cannot import encoders.load_vae ({e}); run data.py from the repository root') from None
        try:
            vae = load_vae(vae, device)
        except (OSError, ValueError, RuntimeError) as e:
            raise UsageError(f'cannot load the VAE {vae!r}: {e}') from None
    elif isinstance(vae, torch.nn.Module):
        vae = vae.to(device)  # a module passed in runs where the batches go
    pre = f'[rank {rank}/{world}] ' if world > 1 else ''
    try:
        if rank == 0:
            _check_config(dest, dict(source=os.path.abspath(source), num_source_images=num_source,
                                     resolution=resolution, vae=vae_name, png_compress_level=png_compress_level))
            _check_classes(dest, classes)
            for g in range((n + 999) // 1000):
                for sub in ('images', 'vae-sd'):
                    os.makedirs(os.path.join(dest, sub, f'{g:05d}'), exist_ok=True)
    except OSError as e:
        raise _dest_error(dest, e) from None

    done = _scan_done(dest, clean_tmp=(rank == 0))
    barrier()  # rank 0 has created folders and removed stale temp files
    if rank != 0:
        done = _scan_done(dest, clean_tmp=False)

    def finished(i):
        img, lat = item_paths(i)
        return f'images/{img}' in done and f'vae-sd/{lat}' in done

    mine = list(range(rank, n, world))
    chunks = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    todo = [c for c in chunks if not all(finished(i) for i in c)]
    already = sum(finished(i) for i in mine)
    total = sum(len(c) for c in todo)
    print(f'{pre}{n} source images in {len(classes)} classes; this rank: {len(mine)} items, {already} already '
          f'done, {total} to process on {device} (batch {batch_size})', file=sys.stderr)

    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        _SourceImages(files, resolution, png_compress_level), batch_sampler=todo, num_workers=num_workers,
        collate_fn=_collate, pin_memory=(device.type == 'cuda'), prefetch_factor=4 if num_workers > 0 else None)
    progress = Progress(total, pre)
    written, bad = 0, []
    with torch.inference_mode():
        for batch in loader:
            ok = [b for b in batch if b[1] is not None]
            bad += [(files[i], err) for i, _, _, err in batch if err is not None]
            if ok:
                x = torch.stack([b[1] for b in ok]).to(device, non_blocking=True)
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1  # uint8 -> [-1, 1], as the released encoder
                mean, std = vae.encode(x)
                moments = torch.cat([mean, std], dim=1).float().cpu().numpy()  # [B, 8, h, w], unscaled
                for (i, _, png, _), m in zip(ok, moments):
                    if finished(i):  # recomputed only to keep the batch identical; its files are already there
                        continue
                    img, lat = item_paths(i)
                    write_atomic(os.path.join(dest, 'images', img), png)
                    write_atomic(os.path.join(dest, 'vae-sd', lat), _npy_bytes(m))
                    written += 1
            progress.update(len(batch), len(bad))
    progress.close(len(bad))
    if bad:
        print(f'{pre}skipped {len(bad)} unreadable source image(s) (no output written for them):', file=sys.stderr)
        for f, err in bad[:20]:
            print(f'  {f}: {err}', file=sys.stderr)
        if len(bad) > 20:
            print(f'  ... and {len(bad) - 20} more', file=sys.stderr)

    barrier()  # every rank has finished its share
    stats = dict(total=n, written=written, skipped=len(bad), already_done=already)
    if rank == 0:
        done = _scan_done(dest, clean_tmp=False)
        items = [i for i in range(n) if finished(i)]
        meta_img = {'labels': [[item_paths(i)[0], labels[i]] for i in items]}
        meta_lat = {'labels': [[item_paths(i)[1], labels[i]] for i in items]}
        # The released training code reads vae-sd/dataset.json; the released image tool writes images/dataset.json.
        write_atomic(os.path.join(dest, 'images', 'dataset.json'), json.dumps(meta_img).encode())
        write_atomic(os.path.join(dest, 'vae-sd', 'dataset.json'), json.dumps(meta_lat).encode())
        stats['dataset_items'] = len(items)
        print(f'done: {len(items)} of {n} source images in {dest!r} ({n - len(items)} unreadable, skipped)',
              file=sys.stderr)
    barrier()
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Training datasets
# ---------------------------------------------------------------------------------------------------------------

def _walk_files(top, exts):
    out = []
    for root, _, names in os.walk(top, followlinks=True):
        out += [os.path.relpath(os.path.join(root, n), top).replace('\\', '/') for n in names
                if os.path.splitext(n)[1].lower() in exts]
    return out


def _item_key(relpath):
    """Pairing key of an image/latent file: folder + trailing digits of the stem
    ('00000/img00000012.png' and '00000/img-mean-std-00000012.npy' -> '00000/00000012'); the stem if no digits."""
    folder, base = os.path.split(relpath)
    stem = os.path.splitext(base)[0]
    m = re.search(r'(\d+)$', stem)
    return f'{folder}/{m.group(1) if m else stem}'


def _read_labels(path):
    try:
        with open(path, 'rb') as f:
            meta = json.load(f)
    except ValueError as e:
        raise UsageError(f'{path} is not valid JSON ({e}); rerun preprocessing (python data.py --help) to rewrite it') from None
    labels = meta.get('labels') if isinstance(meta, dict) else None
    if not isinstance(labels, list) or not all(
            isinstance(x, (list, tuple)) and len(x) == 2 and isinstance(x[0], str)
            and isinstance(x[1], int) and not isinstance(x[1], bool) for x in labels):
        raise UsageError(f'{path} is malformed: expected {{"labels": [["relative/path", class_index], ...]}}'
                        + (' but "labels" is null (a dataset without class labels)' if isinstance(meta, dict)
                           and 'labels' in meta and meta['labels'] is None else ''))
    return {name.replace('\\', '/'): int(y) for name, y in labels}


class ImageLatentDataset(torch.utils.data.Dataset):
    """Clean images + SD-VAE moments + labels from preprocessed data (ours or made for the released code).

    Layouts (ours and the released preprocessing): ROOT/images/ (ours, REPA) or ROOT/imagenet_<res>_vae/ (REG) for
    PNGs, ROOT/vae-sd/ for .npy moments [2C, h, w] = cat(mean, std); labels from ROOT/vae-sd/dataset.json (what
    the released code reads), else the image folder's dataset.json. Images and latents pair by folder + trailing
    number of the file name; the constructor checks that images, latents and labels agree and fails fast.
    Item: (uint8 image [3, H, W], float32 moments [2C, h, w], int label); the diffusion input is
    z = (mean + std * eps) * latent_scale with mean, std = moments.chunk(2).
    """
    latent_scale = VAE_SCALE
    pixel_space = False

    def __init__(self, root):
        if not os.path.isdir(root):
            raise UsageError(f'data dir {root!r} does not exist')
        self.root = root
        cands = ['images'] + sorted(d for d in os.listdir(root)
                                    if re.fullmatch(r'imagenet_\d+_vae', d) and os.path.isdir(os.path.join(root, d)))
        cands = [c for c in cands if os.path.isdir(os.path.join(root, c))]
        self.latents_dir = os.path.join(root, 'vae-sd')
        if not cands or not os.path.isdir(self.latents_dir):
            hint = ''
            if os.path.basename(os.path.normpath(root)) in ('images', 'vae-sd') or re.fullmatch(
                    r'imagenet_\d+_vae', os.path.basename(os.path.normpath(root))):
                hint = f' You pointed at a sub-folder; use its parent {os.path.dirname(os.path.normpath(root))!r}.'
            raise UsageError(f'{root!r} is not a preprocessed dataset: expected an image folder (images/ or '
                            f'imagenet_256_vae/) and vae-sd/ inside it.{hint} Make one with '
                            f'`python data.py --source IMAGENET/train --dest {root}`.')
        if len(cands) > 1:
            raise UsageError(f'{root!r} holds several image folders ({", ".join(cands)}); keep one')
        self.images_dir = os.path.join(root, cands[0])

        images = _walk_files(self.images_dir, IMAGE_EXTS)
        latents = _walk_files(self.latents_dir, {'.npy'})
        if not latents:
            raise UsageError(f'no .npy latent files in {self.latents_dir!r}')
        ikeys = {_item_key(f): f for f in images}
        lkeys = {_item_key(f): f for f in latents}
        if len(ikeys) != len(images) or len(lkeys) != len(latents):
            raise UsageError(f'file names in {root!r} do not pair up uniquely (two files share folder + number)')
        if ikeys.keys() != lkeys.keys():
            no_lat = sorted(ikeys.keys() - lkeys.keys())
            no_img = sorted(lkeys.keys() - ikeys.keys())
            msg = [f'images and latents disagree in {root!r}: {len(images)} images in {cands[0]}/, '
                   f'{len(latents)} latents in vae-sd/.']
            if no_lat:
                msg.append(f'{len(no_lat)} image(s) without a latent, e.g. {", ".join(ikeys[k] for k in no_lat[:3])}.')
            if no_img:
                msg.append(f'{len(no_img)} latent(s) without an image, e.g. {", ".join(lkeys[k] for k in no_img[:3])}.')
            msg.append('Rerun preprocessing (it resumes and fills the gaps) or remove the strays.')
            raise UsageError(' '.join(msg))

        # Labels: released code reads vae-sd/dataset.json (keys = latent paths); fall back to the images' file.
        for d, names in ((self.latents_dir, lkeys), (self.images_dir, ikeys)):
            path = os.path.join(d, 'dataset.json')
            if os.path.isfile(path):
                break
        else:
            raise UsageError(f'no dataset.json (class labels) in {self.latents_dir!r} or {self.images_dir!r}; '
                            f'rerun preprocessing to write it (it skips the finished files)')
        table = _read_labels(path)
        keys = sorted(lkeys)  # lexicographic file order, as the released code's pairing
        missing = [names[k] for k in keys if names[k] not in table]
        if missing or len(table) != len(keys):
            listed = set(table) - {names[k] for k in keys}
            raise UsageError(f'labels and files disagree: {path} has {len(table)} entries for {len(keys)} items'
                            + (f'; no label for {len(missing)} file(s), e.g. {missing[:3]}' if missing else '')
                            + (f'; {len(listed)} listed file(s) do not exist, e.g. {sorted(listed)[:3]}' if listed else '')
                            + '. Rerun preprocessing to rewrite dataset.json.')
        # numpy byte-string arrays, not Python lists: DataLoader workers then share them without copy-on-access.
        self.image_files = np.array([ikeys[k].encode() for k in keys])
        self.latent_files = np.array([lkeys[k].encode() for k in keys])
        self.labels = np.array([table[names[k]] for k in keys], dtype=np.int64)
        if self.labels.min() < 0:
            raise UsageError(f'{path} holds negative class labels')
        self.num_classes = int(self.labels.max()) + 1

        with Image.open(os.path.join(self.images_dir, ikeys[keys[0]])) as im:
            w, h = im.size
        shape = np.load(os.path.join(self.latents_dir, lkeys[keys[0]]), mmap_mode='r').shape
        if w != h or len(shape) != 3 or shape[0] % 2 or shape[1] != shape[2]:
            raise UsageError(f'unexpected shapes in {root!r}: image {w}x{h}, moments {tuple(shape)} '
                            f'(expected square images and [2C, h, h] moments)')
        self.resolution, self.latent_channels, self.latent_size = h, shape[0] // 2, shape[1]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        with Image.open(os.path.join(self.images_dir, self.image_files[idx].decode())) as im:
            if im.mode != 'RGB':
                im = im.convert('RGB')
            image = np.asarray(im)
        image = torch.from_numpy(image.transpose(2, 0, 1).copy())  # [3, H, W] uint8
        moments = torch.from_numpy(np.load(os.path.join(self.latents_dir, self.latent_files[idx].decode())))
        return image, moments.float(), int(self.labels[idx])


# ---------------------------------------------------------------------------------------------------------------
# Sampling across ranks, batch streams, dataset factory
# ---------------------------------------------------------------------------------------------------------------

class ShardSampler(torch.utils.data.Sampler):
    """Like DistributedSampler (drop_last=True): each rank gets a disjoint, equal-size shard of a permutation of
    range(num_items) seeded by (seed, epoch); shards are strided (rank, rank + world_size, ...).

    set_epoch(e) picks the epoch's permutation; set_start(k) makes the NEXT iteration skip the first k items of this
    rank's shard (one-shot, for resuming mid-epoch: k = batches already done this epoch * per-rank batch size).
    """

    def __init__(self, num_items, rank=0, world_size=1, shuffle=True, seed=0):
        if not 0 <= rank < world_size:
            raise UsageError(f'rank {rank} is not in [0, {world_size})')
        if num_items < world_size:
            raise UsageError(f'{num_items} items cannot be split across {world_size} ranks')
        self.num_items, self.rank, self.world_size, self.shuffle, self.seed = num_items, rank, world_size, shuffle, seed
        self.num_samples = num_items // world_size  # per rank; the remainder is dropped
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def set_start(self, index):
        if not 0 <= index <= self.num_samples:
            raise UsageError(f'set_start({index}) is outside this rank\'s shard of {self.num_samples} items')
        self.start = int(index)

    def shard(self):
        """This rank's full index list for the current epoch (ignores set_start)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        return order[self.rank:self.num_samples * self.world_size:self.world_size]

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(self.shard()[start:].tolist())

    def __len__(self):
        return self.num_samples - self.start


class Batches:
    """Endless stream of micro-batches over epochs, with a resumable position.

    `epoch` and `pos` (items of this rank's shard already consumed in that epoch) are saved in checkpoints;
    restoring them makes ShardSampler skip exactly what was already seen."""

    def __init__(self, loader, sampler, micro_batch, epoch=0, pos=0):
        self.loader, self.sampler, self.micro_batch = loader, sampler, micro_batch
        self.epoch, self.pos = epoch, pos
        self._it = None

    def __next__(self):
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.pos)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                self.pos += self.micro_batch
                return batch
            except StopIteration:  # end of this rank's shard: next epoch
                self._it, self.epoch, self.pos = None, self.epoch + 1, 0

    def epochs_done(self):
        """Finished epochs, the current one included once no full micro-batch is left in it (`epoch` itself only
        moves on when the next batch is asked for): `--epochs N` stops after N, and the run ends with a checkpoint."""
        return self.epoch + (self.pos + self.micro_batch > self.sampler.num_samples)


class SyntheticBatches:
    """--benchmark: the same random batch of the real shapes forever (no dataset, no loader cost)."""

    def __init__(self, n, resolution, channels, latent_size, num_classes, pin_memory=False):
        self.batch = (torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8),
                      torch.randn(n, 2 * channels, latent_size, latent_size),
                      torch.randint(0, num_classes, (n,)))
        if pin_memory:  # like the training DataLoader's batches: the copy to the GPU does not block the host
            self.batch = tuple(b.pin_memory() for b in self.batch)
        self.epoch = self.pos = 0

    def __next__(self):
        return self.batch

    def epochs_done(self):
        return 0


def build_dataset(data_dir, resolution=256, toy_samples=10000, seed=0, toy_style=None):
    """`data_dir` == 'toy' -> ToyDataset(toy_samples, resolution, seed); else ImageLatentDataset(data_dir),
    checked against `resolution`. Errors (UsageError) say how to make the data."""
    if data_dir == 'toy':
        return ToyDataset(toy_samples, resolution, seed, toy_style or TOY_STYLE)
    if not os.path.isdir(data_dir):
        raise UsageError(f'data dir {data_dir!r} does not exist. Preprocess ImageNet into it with\n'
                        f'  python data.py --source IMAGENET/train --dest {data_dir} --resolution {resolution}\n'
                        f'or point --data-dir at data made for the released REPA/REG code, '
                        f'or use `--data-dir toy` for the offline smoke preset.')
    ds = ImageLatentDataset(data_dir)
    if ds.resolution != resolution:
        raise UsageError(f'{data_dir!r} holds {ds.resolution}px images but --resolution is {resolution}')
    return ds


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = ArgumentParser(
        prog='data.py', allow_abbrev=False,
        description='Preprocess an ImageNet-style tree (SOURCE/<class>/<image>) for training: ADM center crop,\n'
                    'PNG images, SD-VAE posterior moments, dataset.json, in the layout of the released REPA/REG\n'
                    'code. Resumable: rerun the same command after a crash. Multi-GPU: run it under torchrun.',
        epilog='examples:\n'
               '  python data.py --source ILSVRC/Data/CLS-LOC/train --dest data/imagenet256\n'
               '  torchrun --nproc_per_node=8 data.py --source ILSVRC/Data/CLS-LOC/train --dest data/imagenet512 '
               '--resolution 512\n'
               'then train with --data-dir data/imagenet256',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--source', required=True, help='ImageNet-style folder: SOURCE/<class>/<image>.JPEG '
                                                   '(class index = position among the sorted class folders)')
    p.add_argument('--dest', required=True, help='output folder (images/, vae-sd/, dataset.json)')
    p.add_argument('--resolution', type=int, default=256, help='output size in pixels (256 or 512 for the papers)')
    p.add_argument('--vae', default='mse', help="SD-VAE for encoders.load_vae: 'mse' (released preprocessing), "
                                               "'ema', a hub id, a local file/dir, or 'random' (testing only)")
    p.add_argument('--batch-size', type=int, default=64, help='images per VAE batch per process')
    p.add_argument('--num-workers', type=int, default=None, help='JPEG decoding processes per rank (default: min(8, CPUs))')
    p.add_argument('--device', default=None, help='default: cuda:LOCAL_RANK if available, else cpu')
    p.add_argument('--max-images', type=int, default=None, help='only the first N source images (sorted order)')
    p.add_argument('--png-compress-level', type=int, default=0, choices=range(10),
                   help='0 = uncompressed like the released data (fastest to read); 9 = smallest files')
    a = show_defaults(p).parse_args(released_spelling(sys.argv[1:] if argv is None else argv))
    try:
        preprocess(a.source, a.dest, a.resolution, a.vae, a.batch_size, a.num_workers, a.device, a.max_images,
                   a.png_compress_level)
    except UsageError as e:
        print(f'data.py: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('\ninterrupted: every finished file is kept; rerun the same command to continue', file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
