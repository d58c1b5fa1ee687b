"""data.py: ADM crop, preprocessing (resume, bad input), dataset layouts, toy set + metric, ShardSampler."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import plumbing
from data import ImageLatentDataset, ShardSampler, build_dataset, center_crop_arr, preprocess
from plumbing import UsageError
from toy_world import ToyDataset, TOY_NUM_CLASSES, toy_images, toy_quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



class TinyVAE(torch.nn.Module):
    """A tiny deterministic stand-in with the load_vae API (encode(x in [-1, 1]) -> (mean, std), unscaled, 8x down)
    for the tests of pure file handling; the end-to-end tests use the real code path, load_vae('random')."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)

    def encode(self, x):
        mean, logvar = self.conv(x).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar)


@pytest.fixture(scope='module')
def random_vae():
    from encoders import load_vae
    with warnings.catch_warnings():  # load_vae('random') warns loudly
        warnings.simplefilter('ignore')
        return load_vae('random', 'cpu')


# ----------------------------------------------------------------------------------------------------------------
# ADM center crop vs an independent implementation (explicit PIL fixed-point filter math, no PIL resize)
# ----------------------------------------------------------------------------------------------------------------

def _resample_axis(a, out_n, kind, axis):
    """One separable PIL resampling pass over `axis` of uint8 array `a`, written from the filter definitions:
    output pixel j is centred at (j + 0.5) * scale in input coordinates; box = 1 on (-1/2, 1/2]; bicubic with
    a = -0.5; filter widened by scale when downsampling; weights normalized, then 22-bit fixed point, rounded."""
    in_n = a.shape[axis]
    if in_n == out_n:
        return a
    scale = in_n / out_n
    fs = max(scale, 1.0)

    def filt(x):
        if kind == 'box':
            return 1.0 if -0.5 < x <= 0.5 else 0.0
        x = abs(x)
        if x < 1:
            return (1.5 * x - 2.5) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * -0.5
        return 0.0

    support = (0.5 if kind == 'box' else 2.0) * fs
    K = np.zeros((out_n, in_n), dtype=np.int64)
    for j in range(out_n):
        c = (j + 0.5) * scale
        lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), in_n)
        w = np.array([filt((i - c + 0.5) / fs) for i in range(lo, hi)])
        w = w / w.sum()
        K[j, lo:hi] = np.where(w < 0, (-0.5 + w * 2**22).astype(np.int64), (0.5 + w * 2**22).astype(np.int64))
    x = np.moveaxis(a.astype(np.int64), axis, -1)
    y = (x @ K.T + 2**21) >> 22
    return np.moveaxis(np.clip(y, 0, 255).astype(np.uint8), -1, axis)


def _adm_crop_reference(arr, S, vertical_first):
    """The ADM rule with explicit resampling. PIL resizes in two separable uint8 passes; which pass it runs first
    depends on the Pillow version and the sizes (it changes the last bit), so the caller tries both orders."""
    def resize(a, w, h, kind):
        if vertical_first:
            return _resample_axis(_resample_axis(a, h, kind, 0), w, kind, 1)
        return _resample_axis(_resample_axis(a, w, kind, 1), h, kind, 0)

    h, w = arr.shape[:2]
    while w >= 2 * S and h >= 2 * S:  # halve (floor) both sides while the short one is still >= 2S
        w, h = w // 2, h // 2
        arr = resize(arr, w, h, 'box')
    s = S / min(w, h)
    w, h = round(w * s), round(h * s)
    arr = resize(arr, w, h, 'bicubic')
    top, left = (h - S) // 2, (w - S) // 2
    return arr[top:top + S, left:left + S]


@pytest.mark.parametrize('w,h', [(300, 171), (97, 203), (23, 29), (64, 64), (129, 130)])
def test_center_crop_matches_independent_adm_rule(w, h):
    rng = np.random.default_rng(w * 1000 + h)
    # noise + a gradient: any off-by-one in sizes, offsets or filters shows up as large differences
    arr = (rng.integers(0, 256, (h, w, 3)) * 0.5 + np.linspace(0, 127, w)[None, :, None]).astype(np.uint8)
    out = center_crop_arr(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    refs = [_adm_crop_reference(arr, 32, v) for v in (False, True)]
    assert any(np.array_equal(out, r) for r in refs), \
        f'max abs difference {min(np.abs(out.astype(int) - r).max() for r in refs)}'


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------

def _make_tree(root, n_per_class=(3, 2, 3), corrupt=True):
    """ImageNet-like tree: class folders in non-sorted creation order, odd sizes, one truncated JPEG.
    Returns the expected (source path, label) list in item order (sorted paths)."""
    rng = np.random.default_rng(0)
    classes = ['n03', 'n01', 'n02']  # sorted order decides labels: n01 -> 0, n02 -> 1, n03 -> 2
    expect = []
    for c, k in zip(classes, n_per_class):
        os.makedirs(os.path.join(root, c))
        for j in range(k):
            w, h = int(rng.integers(33, 90)), int(rng.integers(33, 90))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            p = os.path.join(root, c, f'{c}_{j}.JPEG')
            Image.fromarray(arr).save(p, quality=90)
            expect.append(p)
    if corrupt:
        p = os.path.join(root, 'n02', 'n02_bad.JPEG')
        with open(os.path.join(root, 'n02', 'n02_0.JPEG'), 'rb') as f:
            good = f.read()
        with open(p, 'wb') as f:
            f.write(good[:len(good) // 3])  # truncated JPEG
        expect.append(p)
    with open(os.path.join(root, 'n01', 'notes.txt'), 'w') as f:
        f.write('not an image')
    expect.sort()
    return [(p, sorted(classes).index(os.path.basename(os.path.dirname(p)))) for p in expect]


def _tree_bytes(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, 'rb') as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet') / 'train'
    expect = _make_tree(str(root))
    return str(root), expect


@pytest.fixture(scope='module')
def full_run(tree, tmp_path_factory):
    """One uninterrupted run through the real VAE loading path (random SD-VAE), 2 decode workers: the reference
    for the resume tests."""
    dest = str(tmp_path_factory.mktemp('full') / 'out')
    with warnings.catch_warnings():  # load_vae('random') warns loudly
        warnings.simplefilter('ignore')
        stats = preprocess(tree[0], dest, resolution=32, vae='random', batch_size=4, num_workers=2, device='cpu')
    return dest, stats


def test_preprocess_then_dataset_reads_back_right_labels(tree, full_run, random_vae):
    source, expect = tree
    dest, stats = full_run
    bad = [i for i, (p, _) in enumerate(expect) if p.endswith('_bad.JPEG')]
    assert stats['skipped'] == 1 and stats['dataset_items'] == len(expect) - 1 and stats['total'] == len(expect)
    # released naming; the unreadable item leaves a gap in the numbering
    assert os.path.isfile(os.path.join(dest, 'images', '00000', 'img00000000.png'))
    assert os.path.isfile(os.path.join(dest, 'vae-sd', '00000', 'img-mean-std-00000000.npy'))
    assert not os.path.exists(os.path.join(dest, 'images', '00000', f'img{bad[0]:08d}.png'))
    with open(os.path.join(dest, 'vae-sd', 'dataset.json')) as f:
        meta = json.load(f)
    good = [(i, p, y) for i, (p, y) in enumerate(expect) if i not in bad]
    assert meta['labels'] == [[f'00000/img-mean-std-{i:08d}.npy', y] for i, _, y in good]

    ds = ImageLatentDataset(dest)
    assert len(ds) == len(good) and ds.num_classes == 3
    assert (ds.resolution, ds.latent_channels, ds.latent_size) == (32, 4, 4)
    assert ds.latent_scale == pytest.approx(0.18215) and ds.pixel_space is False
    images, moments, labels = (torch.stack(t) if k < 2 else list(t) for k, t in enumerate(zip(*ds)))
    assert labels == [y for _, _, y in good]
    assert images.dtype == torch.uint8 and images.shape == (len(good), 3, 32, 32)
    for image, (_, src, _) in zip(images, good):
        with Image.open(src) as im:
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), center_crop_arr(im.convert('RGB'), 32))
    assert moments.dtype == torch.float32 and moments.shape == (len(good), 8, 4, 4)
    mean, std = random_vae.encode(images.float() / 127.5 - 1)  # the moments belong to the paired image
    torch.testing.assert_close(moments, torch.cat([mean, std], 1), atol=1e-4, rtol=1e-4)


def test_cli_help_and_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(['--help'])
    out = ' '.join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert e.value.code == 0 and '--source' in out
    assert '(default: 256)' in out and '(default: mse)' in out and '(default: 64)' in out
    assert 'smallest files (default: 0)' in out  # a default of 0 is shown too
    empty = tmp_path / 'empty'
    (empty / 'n01').mkdir(parents=True)
    assert data.main(['--source', str(empty), '--dest', str(tmp_path / 'o')]) == 2
    assert 'no images found' in capsys.readouterr().err
    assert data.main(['--source', str(tmp_path / 'nope'), '--dest', str(tmp_path / 'o')]) == 2
    assert 'is not a folder' in capsys.readouterr().err


def test_unwritable_dest_stops_with_one_line_before_the_vae_is_loaded(tree, tmp_path, capsys, monkeypatch):
    import encoders
    monkeypatch.setattr(encoders, 'load_vae', lambda *a, **k: pytest.fail('the VAE was loaded first'))
    (tmp_path / 'a_file').write_text('')
    assert data.main(['--source', tree[0], '--dest', str(tmp_path / 'a_file' / 'out'), '--vae', 'mse']) == 2
    err = capsys.readouterr().err
    assert err.startswith('data.py: error: cannot write to --dest') and 'writable' in err and err.count('\n') == 1


def test_an_empty_class_folder_keeps_its_label_and_the_map_is_saved(tmp_path, capsys):
    # cat / dog (empty) / fish: fish is class 2, as in a tree where dog has images; hidden folders are no class.
    src = tmp_path / 'src'
    for c in ('cat', 'dog', 'fish', '.cache'):
        (src / c).mkdir(parents=True)
    for c in ('cat', 'fish', '.cache'):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(src / c / 'a.png')
    files, labels, classes = data.list_source_images(str(src))
    assert classes == ['cat', 'dog', 'fish'] and labels == [0, 2]
    assert [os.path.basename(os.path.dirname(f)) for f in files] == ['cat', 'fish']
    assert 'dog' in capsys.readouterr().err  # the warning names the empty folder
    dest = tmp_path / 'out'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        preprocess(str(src), str(dest), resolution=16, vae='random', batch_size=2, num_workers=0, device='cpu')
    assert json.loads((dest / 'classes.json').read_text()) == {'cat': 0, 'dog': 1, 'fish': 2}
    assert [y for _, y in json.loads((dest / 'vae-sd' / 'dataset.json').read_text())['labels']] == [0, 2]


def test_killed_run_resumes_to_identical_output(tree, full_run, tmp_path, capsys):
    """The real command line in a subprocess, SIGKILLed after its first finished item, then rerun: the result is
    byte-identical to the uninterrupted run."""
    dest = str(tmp_path / 'out')
    args = ['--source', tree[0], '--dest', dest, '--resolution', '32', '--vae', 'random', '--batch-size', '4',
            '--num-workers', '0', '--device', 'cpu']
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'data.py')] + args, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lat_dir = os.path.join(dest, 'vae-sd', '00000')
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(lat_dir) and any(n.endswith('.npy') for n in os.listdir(lat_dir)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(lat_dir), f'the preprocessing subprocess wrote nothing (exit code {proc.returncode})'
    n_done = sum(n.endswith('.npy') for n in os.listdir(lat_dir))
    assert 1 <= n_done < 8, 'the kill should land mid-run'
    assert not os.path.exists(os.path.join(dest, 'vae-sd', 'dataset.json'))
    # what a kill during a write leaves behind: a temp file, never trusted and removed by the rerun
    with open(os.path.join(dest, 'images', '00000', 'img00000007.png.999.tmp'), 'wb') as f:
        f.write(b'\x89PNG half')
    with warnings.catch_warnings():  # load_vae('random') warns loudly
        warnings.simplefilter('ignore')
        assert data.main(args) == 0
    err = capsys.readouterr().err
    assert f'{n_done} already done' in err and 'skipped 1 unreadable' in err and 'n02_bad.JPEG' in err
    assert _tree_bytes(dest) == _tree_bytes(full_run[0])


def test_full_disk_keeps_written_files_and_resumes(tree, full_run, random_vae, tmp_path, monkeypatch):
    dest = str(tmp_path / 'out')
    real_open, calls = open, [0]

    class HalfWriter:  # writes half of the data, then the disk is full
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(bytes(b)[:len(b) // 2])
            raise OSError(errno.ENOSPC, 'No space left on device')

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode='r', *a, **k):
        if 'w' in mode and str(path).endswith('.tmp') and '.png' in str(path):
            calls[0] += 1
            if calls[0] > 4:
                return HalfWriter(real_open(path, mode, *a, **k))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(plumbing, 'open', fake_open, raising=False)
    with pytest.raises(UsageError, match='no space left.*rerun the same command'):
        preprocess(tree[0], dest, resolution=32, vae=random_vae, batch_size=4, num_workers=0)
    monkeypatch.undo()
    files = _tree_bytes(dest)
    assert not any(p.endswith('.tmp') for p in files)
    ref = _tree_bytes(full_run[0])
    written = [p for p in files if p.endswith(('.png', '.npy'))]
    assert len(written) == 8  # 4 complete items, each byte-identical to the uninterrupted run
    assert all(files[p] == ref[p] for p in written)
    preprocess(tree[0], dest, resolution=32, vae=random_vae, batch_size=4, num_workers=0)
    files = _tree_bytes(dest)
    assert json.loads(files.pop('preprocess.json'))['vae'] == 'AutoencoderKL'  # the only file that may differ
    ref.pop('preprocess.json')
    assert files == ref


def test_resume_refuses_other_settings(tree, full_run, tmp_path):
    dest = str(tmp_path / 'out')
    preprocess(tree[0], dest, resolution=32, vae=TinyVAE(), batch_size=4, num_workers=0, max_images=2)
    with pytest.raises(UsageError, match='other settings.*resolution'):
        preprocess(tree[0], dest, resolution=64, vae=TinyVAE(), batch_size=4, num_workers=0)


# ----------------------------------------------------------------------------------------------------------------
# Dataset: released layouts and bad input
# ----------------------------------------------------------------------------------------------------------------

def _released_tree(root, image_dir, n=5, labels=(7, 2, 9, 2, 0), res=16):
    """Hand-built tree as the released REPA/REG preprocessing writes it (names via explicit f-strings)."""
    rng = np.random.default_rng(1)
    entries = []
    for i in range(n):
        folder = f'{i // 1000:05d}'
        for d in (os.path.join(root, image_dir, folder), os.path.join(root, 'vae-sd', folder)):
            os.makedirs(d, exist_ok=True)
        img = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(root, image_dir, folder, f'img{i:08d}.png'), compress_level=0)
        mom = rng.standard_normal((8, res // 8, res // 8)).astype(np.float32)
        np.save(os.path.join(root, 'vae-sd', folder, f'img-mean-std-{i:08d}.npy'), mom)
        entries.append((img, mom, labels[i]))
    with open(os.path.join(root, 'vae-sd', 'dataset.json'), 'w') as f:
        json.dump({'labels': [[f'00000/img-mean-std-{i:08d}.npy', labels[i]] for i in range(n)]}, f)
    return entries


@pytest.mark.parametrize('image_dir', ['images', 'imagenet_256_vae'])  # REPA, REG
def test_dataset_reads_released_layouts(tmp_path, image_dir):
    entries = _released_tree(str(tmp_path), image_dir)
    ds = ImageLatentDataset(str(tmp_path))
    assert len(ds) == 5 and ds.num_classes == 10 and (ds.resolution, ds.latent_channels, ds.latent_size) == (16, 4, 2)
    for k, (img, mom, y) in enumerate(entries):
        image, moments, label = ds[k]
        np.testing.assert_array_equal(image.numpy(), img.transpose(2, 0, 1))
        np.testing.assert_array_equal(moments.numpy(), mom)
        assert label == y and isinstance(label, int)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)
    x, m, y = next(iter(loader))
    assert x.shape == (2, 3, 16, 16) and m.shape == (2, 8, 2, 2) and y.tolist() == [7, 2]


def test_dataset_fails_fast_on_disagreement(tmp_path):
    root = str(tmp_path)
    _released_tree(root, 'images')
    os.remove(os.path.join(root, 'vae-sd', '00000', 'img-mean-std-00000003.npy'))
    with pytest.raises(UsageError, match=r'5 images.*4 latents.*img00000003\.png'):
        ImageLatentDataset(root)
    np.save(os.path.join(root, 'vae-sd', '00000', 'img-mean-std-00000003.npy'), np.zeros((8, 2, 2), np.float32))
    ImageLatentDataset(root)  # consistent again
    os.rename(os.path.join(root, 'images', '00000', 'img00000004.png'),
              os.path.join(root, 'images', '00000', 'img00000005.png'))
    with pytest.raises(UsageError, match=r'img00000005\.png.*img-mean-std-00000004\.npy'):
        ImageLatentDataset(root)


def test_dataset_label_file_errors(tmp_path):
    root = str(tmp_path)
    _released_tree(root, 'images')
    meta = os.path.join(root, 'vae-sd', 'dataset.json')
    with open(meta, 'w') as f:
        json.dump({'labels': [[f'00000/img-mean-std-{i:08d}.npy', 1] for i in range(4)]}, f)
    with pytest.raises(UsageError, match=r'4 entries for 5 items.*img-mean-std-00000004'):
        ImageLatentDataset(root)
    with open(meta, 'w') as f:
        f.write('{"labels": [["00000/img-mean-std-0')
    with pytest.raises(UsageError, match='not valid JSON'):
        ImageLatentDataset(root)
    with open(meta, 'w') as f:
        json.dump({'labels': None}, f)
    with pytest.raises(UsageError, match='malformed.*null'):
        ImageLatentDataset(root)
    os.remove(meta)
    with pytest.raises(UsageError, match='no dataset.json'):
        ImageLatentDataset(root)
    with pytest.raises(UsageError, match='use its parent'):
        ImageLatentDataset(os.path.join(root, 'vae-sd'))


def test_build_dataset(tmp_path):
    with pytest.raises(UsageError, match=r'(?s)does not exist.*python data.py.*--data-dir toy'):
        build_dataset(str(tmp_path / 'missing'), 256)
    _released_tree(str(tmp_path / 'd'), 'images')
    assert len(build_dataset(str(tmp_path / 'd'), 16)) == 5
    with pytest.raises(UsageError, match='16px images but --resolution is 256'):
        build_dataset(str(tmp_path / 'd'), 256)
    toy = build_dataset('toy', 32, toy_samples=50, seed=3)
    assert isinstance(toy, ToyDataset) and len(toy) == 50 and toy.seed == 3


# ----------------------------------------------------------------------------------------------------------------
# Toy set and its metric
# ----------------------------------------------------------------------------------------------------------------

def test_toy_dataset_items():
    ds = ToyDataset(100, resolution=32, seed=0)
    assert (ds.num_classes, ds.latent_scale, ds.pixel_space, ds.latent_channels, ds.latent_size) == \
        (TOY_NUM_CLASSES, 1.0, True, 3, 32)
    image, moments, label = ds[17]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == 17 % TOY_NUM_CLASSES
    torch.testing.assert_close(moments[:3], image.float() * 2 / 255 - 1)
    assert moments.shape == (6, 32, 32) and moments[3:].abs().max() == 0
    assert torch.equal(ToyDataset(100, 32, seed=0)[17][0], image)  # deterministic from (seed, index)
    same_class = [ds[17 + k * TOY_NUM_CLASSES][0] for k in range(3)]
    assert ds.style == "centred" and torch.equal(same_class[0], same_class[1])  # one image per class
    varied = ToyDataset(100, 32, seed=0, style="varied")
    assert not torch.equal(ToyDataset(100, 32, seed=1, style="varied")[17][0], varied[17][0])
    same_class = [varied[17 + k * TOY_NUM_CLASSES][0].float() for k in range(3)]
    assert (same_class[0] - same_class[1]).abs().mean() > 5  # within-class variation


def test_toy_quality_real_near_one_noise_near_chance():
    imgs, labels = toy_images(np.arange(50 * TOY_NUM_CLASSES), 32, seed=7)  # not the prototypes' seed
    assert toy_quality(torch.from_numpy(imgs), torch.from_numpy(labels)) >= 0.98
    chance = 1 / TOY_NUM_CLASSES
    noise = torch.randint(0, 256, imgs.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert abs(toy_quality(noise, labels) - chance) < 0.05
    shuffled = np.random.default_rng(0).permutation(labels)  # right images, wrong labels
    assert abs(toy_quality(imgs, shuffled) - chance) < 0.05
    with pytest.raises(UsageError, match='uint8'):
        toy_quality(torch.zeros(2, 3, 32, 32), labels[:2])


# ----------------------------------------------------------------------------------------------------------------
# ShardSampler
# ----------------------------------------------------------------------------------------------------------------

def test_shard_sampler_disjoint_epochs_and_exact_resume():
    n, world = 103, 4
    samplers = [ShardSampler(n, r, world, seed=5) for r in range(world)]
    shards = [list(s) for s in samplers]
    assert all(len(s) == n // world == len(sp) for s, sp in zip(shards, samplers))
    flat = sum(shards, [])
    assert len(set(flat)) == len(flat) == 100 and set(flat) <= set(range(n))  # disjoint, remainder dropped
    for s in samplers:
        s.set_epoch(1)
    shards1 = [list(s) for s in samplers]
    assert shards1 != shards and len(set(sum(shards1, []))) == 100
    s = ShardSampler(n, 2, world, seed=5)
    s.set_epoch(1)
    assert list(s) == shards1[2]  # same (seed, epoch) -> same order in a fresh process
    s.set_start(7)
    assert len(s) == 25 - 7 and list(s) == shards1[2][7:]  # resumes exactly
    assert list(s) == shards1[2]  # set_start is one-shot
    assert list(ShardSampler(10, 1, 2, shuffle=False)) == [1, 3, 5, 7, 9]
    with pytest.raises(UsageError):
        s.set_start(26)
