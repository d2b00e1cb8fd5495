"""Bad input, one line: the list of malformed inputs polynext answers cleanly (the README's promise points here).

Every case runs the command line in this process (``polynext.cli.main``) and asserts:

* the exit code (2 for an error the user fixes);
* the whole output (stdout and stderr together) is one line, ``polynext COMMAND: error: ...``, naming the
  problem and the fix, and no traceback;
* nothing was written: the workspace (data, checkpoints, run folders) and the working folder are unchanged
  (no run folder, no report, no temporary file).

A new command adds its cases to ``CASES``: one ``Case`` per malformed input, with the words of the problem and
of the fix that its message must hold.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import pytest
import torch

import polynext
from polynext.checkpoint import save_safetensors
from polynext.cli import main
from polynext.engine.config import config_to_dict

from conftest import read_only_mount
from test_train_run import make_image_folder

#: the tiny classification run every ``train`` case starts from (the digits demo's recipe on an image folder)
TRAIN = ['train', '--recipe', 'cpolynext_lr_digits', '--set', 'model_kwargs={init_channels: 8}', '--batch-size', '8',
         '--device-batch-size', '8', '--workers', '0', '--no-progress', '--epochs', '1']
#: the tiny segmentation run every ``seg train`` case starts from
SEG = ['seg', 'train', '--recipe', 'upernet_cpolynext_s', '--backbone', 'cpolynext_t', '--iters', '2',
       '--batch-size', '2', '--device-batch-size', '2', '--workers', '0', '--no-progress', '--set', 'warmup_iters=1',
       '--set', 'backbone_kwargs={init_channels: 8}', '--set', 'head_channels=16', '--set', 'aux_channels=8',
       '--set', 'img_scale=[64,32]', '--set', 'crop_size=32', '--set', 'eval_scale=[64,32]', '--set', 'eval_crop=32',
       '--set', 'eval_stride=21']
#: the tiny detection run every ``det train`` case starts from
DET = ['det', 'train', '--recipe', 'maskrcnn_shapes_demo', '--set', 'backbone_kwargs={init_channels: 8}',
       '--set', 'fpn_channels=16', '--set', 'box_fc=32', '--set', 'mask_channels=8', '--set', 'train_scales=[48]',
       '--set', 'test_scale=48', '--set', 'warmup_iters=1', '--set', 'lr_steps=[1]', '--epochs', '1',
       '--batch-size', '2', '--device-batch-size', '2', '--workers', '0', '--no-progress']


class W:
    """Paths of the workspace (built once per module by the ``ws`` fixture): ``w.NAME`` is ``ROOT/NAME`` where the
    name has no dot, else the file of ``FILES``."""
    FILES = {'nope_pt': 'nope.pt', 'cls_safetensors': 'cls.safetensors', 'abcd_safetensors': 'abcd.safetensors',
             'truncated_safetensors': 'truncated.safetensors', 'ten_pth': 'ten.pth', 'linear_pth': 'linear.pth',
             'seg_safetensors': 'seg.safetensors', 'truncated_seg_safetensors': 'truncated_seg.safetensors',
             'garbage_pt': 'garbage.pt', 'objects_pt': 'objects.pt', 'bad_yaml': 'bad.yaml', 'noise_pt': 'noise.pt', 'cls_t_safetensors': 'cls_t.safetensors',
             'det_safetensors': 'det.safetensors', 'truncated_det_safetensors': 'truncated_det.safetensors'}

    def __init__(self, root: Path):
        self.root = root

    def __getattr__(self, name: str) -> str:
        return str(self.root / self.FILES.get(name, name))


@dataclass
class Case:
    id: str
    argv: Callable[[W], List[str]]
    problem: str                      # words of the message that name the problem
    fix: str                          # ... and the fix
    setup: Optional[Callable[[W, pytest.MonkeyPatch], None]] = None
    code: int = 2
    check: Optional[Callable[[str], None]] = None
    needs: Optional[str] = None       # a module of an optional extra (skipped without it)


# ---------------------------------------------------------------------------------------------
# simulated file-system conditions (tests run as root, where chmod does not make a folder read-only)
# ---------------------------------------------------------------------------------------------

def read_only(folder: str):
    """A setup where ``folder`` is on a read-only mount, as the kernel reports it: ``access(W_OK)`` fails and
    ``statvfs`` has ``ST_RDONLY``; creating a file there fails with EROFS."""
    def setup(ws: W, monkeypatch: pytest.MonkeyPatch) -> None:
        read_only_mount(monkeypatch, Path(getattr(ws, folder)))
    return setup


def disk_free(nbytes: int):
    """A setup where every disk has ``nbytes`` free."""
    def setup(ws: W, monkeypatch: pytest.MonkeyPatch) -> None:
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, 'disk_usage', lambda p: real(p)._replace(free=nbytes))
    return setup


def distinct_suggestions(line: str) -> None:
    """'Did you mean 'a', 'b'?' names each model once."""
    names = line.split('Did you mean ')[1].split('?')[0].split(', ')
    assert len(names) == len(set(names)) > 0, names


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------

CASES: Sequence[Case] = [
    # ---- polynext train: the output folder -------------------------------------------------------------------------
    Case('train-output-is-a-file', lambda w: TRAIN + ['--data', w.data, '--output', w.afile],
         'is a file, not a folder', 'pass a folder path'),
    Case('train-output-under-a-file', lambda w: TRAIN + ['--data', w.data, '--output', w.afile + '/run'],
         'cannot be created', 'pass a path whose parents are folders'),
    Case('train-output-read-only', lambda w: TRAIN + ['--data', w.data, '--output', w.ro + '/run'],
         'the file system is read-only', 'pass --output a writable folder', setup=read_only('ro')),
    Case('train-no-disk-space', lambda w: TRAIN + ['--data', w.data, '--output', w.root / 'run'],
         'not enough disk space', 'free some space or pass --output a folder on another disk',
         setup=disk_free(1000)),
    # ---- polynext train: the data ----------------------------------------------------------------------------------
    Case('train-data-not-found', lambda w: TRAIN + ['--data', w.nope, '--output', w.root / 'run'],
         'data folder not found', 'DIR/train/<class>/<image>'),
    Case('train-data-needed', lambda w: ['train', '--recipe', 'cpolynext_t'],
         'needs a data folder', 'pass --data DIR'),
    Case('train-data-is-a-file', lambda w: TRAIN + ['--data', w.afile, '--output', w.root / 'run'],
         'is a file', '--data must be a folder'),
    Case('train-data-without-val', lambda w: TRAIN + ['--data', w.noval, '--output', w.root / 'run'],
         'has no val/ folder', 'expected DIR/train/<class>/<image> and DIR/val/<class>/<image>'),
    Case('train-data-without-classes', lambda w: TRAIN + ['--data', w.noclass, '--output', w.root / 'run'],
         "Couldn't find any class folder", 'expected'),
    Case('train-data-without-images', lambda w: TRAIN + ['--data', w.noimage, '--output', w.root / 'run'],
         'Found no valid file for the classes cat', 'with image files'),
    Case('train-data-classes-differ', lambda w: TRAIN + ['--data', w.mismatch, '--output', w.root / 'run'],
         "'dog' is in train/ but not in val/", 'Both must hold the same class folders'),
    Case('train-data-cifar-without-download', lambda w: ['train', '--recipe', 'cpolynext_lr_cifar10', '--data',
                                                         w.emptydir, '--output', w.root / 'run'],
         'CIFAR10 not found in', 'pass --download'),
    # ---- polynext train: names and values ----------------------------------------------------------------------------
    Case('train-unknown-model', lambda w: ['train', '--model', 'cpolynxt_t'],
         "unknown model 'cpolynxt_t'", "Did you mean 'cpolynext_t'", check=distinct_suggestions),
    Case('train-unknown-recipe', lambda w: ['train', '--recipe', 'apolynext_xl'],
         "unknown recipe 'apolynext_xl'", '`polynext train --list-recipes` lists them'),
    Case('train-bad-value', lambda w: ['train', '--set', 'lr=abc'],
         "bad value for 'lr'", 'is not a number'),
    Case('train-bad-set-syntax', lambda w: ['train', '--set', 'lr'],
         "bad --set argument 'lr'", 'write it as key=value'),
    Case('train-model-kwargs-yaml-without-space', lambda w: TRAIN + ['--data', w.data, '--output', w.root / 'run',
                                                                     '--set', 'model_kwargs={init_channels:8}'],
         "argument 'init_channels:8' is not a name", "write 'init_channels: 8' (a space after the colon)"),
    Case('train-fhe-levels-zero', lambda w: TRAIN + ['--data', w.data, '--output', w.root / 'run', '--fhe-levels', '0'],
         '--fhe-levels must be positive', 'got 0'),
    Case('train-unknown-key', lambda w: ['train', '--set', 'warmup=5'],
         "unknown config key 'warmup' in --set", '`polynext train --show-config` lists the keys'),
    Case('train-fine-tune-without-checkpoint', lambda w: ['train', '--recipe', 'caformer_s18_384'],
         'fine-tunes a trained model', 'pass --initial-checkpoint PATH'),
    Case('train-bad-yaml', lambda w: ['train', '--config', w.bad_yaml],
         'cannot parse', 'as YAML (line 3)'),
    Case('train-config-not-found', lambda w: ['train', '--config', w.nope],
         'config file not found', 'nope'),
    Case('train-batch-not-a-multiple', lambda w: TRAIN + ['--data', w.data, '--device-batch-size', '3'],
         'is not a multiple of the per-device batch 3', 'change --batch-size or --device-batch-size'),
    Case('train-bad-nonfinite-policy', lambda w: TRAIN + ['--data', w.data, '--set', 'on_nonfinite=retry'],
         "bad value for 'on_nonfinite'", 'choose one of stop, skip, rollback'),
    Case('train-warmup-longer-than-the-run', lambda w: TRAIN + ['--data', w.data, '--set', 'warmup_epochs=5'],
         'warmup_epochs 5 must be below epochs 1', 'pass --set warmup_epochs=0'),
    Case('train-negative-epochs', lambda w: TRAIN + ['--data', w.data, '--epochs', '0'],
         "bad value for 'epochs'", 'it must be positive'),
    # ---- polynext train: initial checkpoints -----------------------------------------------------------------------
    Case('train-initial-checkpoint-not-found', lambda w: TRAIN + ['--data', w.data, '--output', w.root / 'run',
                                                                  '--initial-checkpoint', w.nope_pt],
         'checkpoint not found', 'check the path'),
    Case('train-initial-checkpoint-not-a-checkpoint', lambda w: TRAIN + ['--data', w.data, '--output', w.root / 'run',
                                                                         '--initial-checkpoint', w.garbage_pt],
         'as a PyTorch checkpoint', 'copy it again from where it came from'),
    Case('train-initial-checkpoint-objects', lambda w: TRAIN + ['--data', w.data, '--output', w.root / 'run',
                                                                '--initial-checkpoint', w.objects_pt],
         'holds objects other than tensors', 'save the state_dict() instead'),
    Case('train-initial-checkpoint-other-classes', lambda w: TRAIN + ['--data', w.data, '--output', w.root / 'run',
                                                                      '--initial-checkpoint', w.ten_pth],
         'has 10 classes but the data has 4', 'use data with the same classes'),
    # ---- polynext train: resuming ---------------------------------------------------------------------------------
    Case('train-resume-not-found', lambda w: ['train', '--resume', w.nope_pt],
         'checkpoint not found', 'check the path'),
    Case('train-resume-weights-only', lambda w: ['train', '--resume', w.cls_safetensors],
         'is not a polynext training-state file', 'use it as an initial checkpoint instead of --resume'),
    Case('train-resume-changes-the-model', lambda w: ['train', '--resume', w.run_train, '--model', 'cpolynext_t'],
         "cannot change 'model' when resuming", 'A resumed run may change lr, min_lr, weight_decay, clip_grad'),
    Case('train-resume-of-another-task', lambda w: ['train', '--resume', w.run_seg],
         "is a 'polynext.seg/1' training state, not 'polynext.train/1'",
         'resume it with the command that wrote it'),
    Case('train-resume-truncated-state', lambda w: ['train', '--resume', w.run_truncated],
         'cannot be read (truncated or corrupt)', 'start over with --fresh'),
    Case('train-rerun-with-another-config', lambda w: TRAIN + ['--data', w.data, '--output', w.run_train],
         'holds a run with another config (lr: 0.5 there, 0.01 now)', '--set lr=0.01` to continue it'),
    # ---- polynext validate -------------------------------------------------------------------------------------------
    Case('validate-checkpoint-not-found', lambda w: ['validate', '--checkpoint', w.nope_pt, '--data', w.data],
         'checkpoint not found', 'check the path'),
    Case('validate-not-a-checkpoint', lambda w: ['validate', '--model', 'cpolynext_lr', '--checkpoint', w.garbage_pt,
                                                 '--data', w.data],
         'as a PyTorch checkpoint', 'copy it again'),
    Case('validate-noise-pt', lambda w: ['validate', '--model', 'cpolynext_lr', '--checkpoint', w.noise_pt, '--data',
                                         w.data],
         'the file is truncated, corrupt or not a checkpoint', 'copy it again'),
    Case('validate-truncated-safetensors', lambda w: ['validate', '--checkpoint', w.truncated_safetensors,
                                                      '--data', w.data],
         'the file is truncated or corrupt', 'copy it again'),
    Case('validate-classes-differ', lambda w: ['validate', '--checkpoint', w.abcd_safetensors, '--data', w.data,
                                               '--no-progress', '--workers', '0'],
         "class 0 is 'a' in the checkpoint but 'class_0' in the data", 'evaluate it on data with the classes'),
    Case('validate-output-is-a-file', lambda w: ['validate', '--checkpoint', w.cls_safetensors, '--data', w.data,
                                                 '--output', w.afile],
         'is a file, not a folder', 'pass a folder path'),
    Case('validate-other-class-count', lambda w: ['validate', '--model', 'cpolynext_lr', '--model-kwargs',
                                                  '{init_channels: 8}', '--checkpoint', w.ten_pth, '--data', w.data],
         'the checkpoint has 10 classes but image folders', 'evaluate it on data with the classes it was trained on'),
    Case('validate-unnamed-model', lambda w: ['validate', '--checkpoint', w.ten_pth, '--data', w.data],
         'does not say which model it holds', 'pass --model NAME'),
    Case('validate-model-kwargs-not-a-mapping', lambda w: ['validate', '--checkpoint', w.cls_safetensors,
                                                           '--model-kwargs', '[1, 2]'],
         '--model-kwargs must be a mapping', "like '{init_channels: 16}'"),
    Case('validate-a-segmentor', lambda w: ['validate', '--checkpoint', w.seg_safetensors, '--data', w.data],
         'holds a segmentor', '`polynext seg eval --checkpoint'),
    Case('validate-bf16-onnx', lambda w: ['validate', '--checkpoint', str(w.root / 'model.onnx'), '--dtype', 'bf16',
                                          '--data', w.data],
         '--dtype bf16 runs the torch model under autocast', 'drop --dtype or validate the .safetensors checkpoint'),
    # ---- polynext convert --------------------------------------------------------------------------------------------
    Case('convert-onto-its-input', lambda w: ['convert', w.cls_safetensors, w.cls_safetensors],
         'is the input file', 'pass another output path'),
    Case('convert-output-not-safetensors', lambda w: ['convert', w.cls_safetensors, w.root / 'out.pt'],
         'output must end in .safetensors', 'name it'),
    Case('convert-output-under-a-file', lambda w: ['convert', w.cls_safetensors, w.afile + '/x.safetensors'],
         'is a file, not a folder', 'pass a path whose parents are folders'),
    Case('convert-no-disk-space', lambda w: ['convert', w.cls_safetensors, w.root / 'out.safetensors'],
         'not enough disk space for', 'free some space or pass an output path on another disk',
         setup=disk_free(1000)),
    Case('convert-input-not-found', lambda w: ['convert', w.nope_pt, w.root / 'x.safetensors'],
         'checkpoint not found', 'check the path'),
    Case('convert-unknown-layout', lambda w: ['convert', w.linear_pth, w.root / 'x.safetensors'],
         'cannot infer the model from this checkpoint', 'pass --model NAME'),
    # ---- polynext seg ------------------------------------------------------------------------------------------------
    Case('seg-train-data-not-found', lambda w: SEG + ['--data', w.nope, '--output', w.root / 'run'],
         'dataset folder not found', 'ADEChallengeData2016'),
    Case('seg-train-no-annotations', lambda w: SEG + ['--data', w.ade_noann, '--output', w.root / 'run'],
         'annotations/training is missing', 'ADEChallengeData2016'),
    Case('seg-train-images-and-annotations-differ', lambda w: SEG + ['--data', w.ade_mismatch,
                                                                      '--output', w.root / 'run'],
         'images and annotations do not match', 'needs a PNG of the same name'),
    Case('seg-train-needs-data', lambda w: ['seg', 'train', '--recipe', 'upernet_cpolynext_s'],
         'trains on ADE20K', 'pass --data PATH/ADEChallengeData2016'),
    Case('seg-train-unknown-recipe', lambda w: ['seg', 'train', '--recipe', 'upernet_cpolynext'],
         "unknown recipe 'upernet_cpolynext'. Did you mean 'upernet_cpolynext_s'",
         '`polynext seg train --list-recipes` lists them'),
    Case('seg-train-unknown-backbone', lambda w: SEG + ['--data', w.ade, '--backbone', 'cpolynxt_t'],
         "unknown model 'cpolynxt_t'", 'Did you mean', check=distinct_suggestions),
    Case('seg-train-unknown-key', lambda w: SEG + ['--data', w.ade, '--set', 'hed_channels=3'],
         "unknown config key 'hed_channels'", "Did you mean 'head_channels'"),
    Case('seg-train-warmup-longer-than-the-run', lambda w: ['seg', 'train', '--iters', '2'],
         'warmup_iters 50 must be below iters 2', 'pass --set warmup_iters=1'),
    Case('seg-train-batch-not-a-multiple', lambda w: SEG + ['--data', w.ade, '--device-batch-size', '3'],
         'is not a multiple of the per-device batch 3', 'change --batch-size or --device-batch-size'),
    Case('seg-train-one-image-per-device', lambda w: SEG + ['--data', w.ade, '--output', w.root / 'run',
                                                            '--device-batch-size', '1'],
         'a per-device batch of 1 cannot train UperNet', 'Use --device-batch-size 2 or more'),
    Case('seg-train-no-disk-space', lambda w: SEG + ['--data', w.ade, '--output', w.root / 'run'],
         'not enough disk space', 'free some space or pass --output a folder on another disk',
         setup=disk_free(1000)),
    Case('seg-train-output-read-only', lambda w: SEG + ['--data', w.ade, '--output', w.ro + '/run'],
         'the file system is read-only', 'pass --output a writable folder', setup=read_only('ro')),
    Case('seg-train-output-is-a-file', lambda w: SEG + ['--data', w.ade, '--output', w.afile],
         'is a file, not a folder', 'pass a folder path'),
    Case('seg-train-cell-grad-clip-on-another-backbone',
         lambda w: SEG + ['--data', w.ade, '--output', w.root / 'run', '--backbone', 'test_convnext', '--set',
                          'backbone_kwargs={}', '--set', 'cell_grad_clip=5'],
         'cell_grad_clip applies to PolyNeXt backbones only', 'set --set cell_grad_clip=null'),
    Case('seg-train-checkpoint-of-another-model',
         lambda w: SEG + ['--data', w.ade, '--output', w.root / 'run', '--backbone', 'convformer_s18', '--set',
                          'backbone_kwargs={}', '--initial-checkpoint', w.cls_safetensors],
         'holds cpolynext_lr weights, not convformer_s18', 'pass --backbone cpolynext_lr'),
    Case('seg-train-initial-checkpoint-not-found', lambda w: SEG + ['--data', w.ade, '--output', w.root / 'run',
                                                                    '--initial-checkpoint', w.nope_pt],
         'checkpoint not found', 'check the path'),
    Case('seg-train-resume-a-classifier-run', lambda w: ['seg', 'train', '--resume', w.run_train],
         "is a 'polynext.train/1' training state, not 'polynext.seg/1'", 'resume it with the command that wrote it'),
    Case('seg-eval-checkpoint-not-found', lambda w: ['seg', 'eval', '--checkpoint', w.nope_pt, '--data', w.ade],
         'checkpoint not found', 'check the path'),
    Case('seg-eval-truncated-safetensors', lambda w: ['seg', 'eval', '--checkpoint', w.truncated_seg_safetensors,
                                                      '--data', w.ade],
         'the file is truncated or corrupt', 'copy it again'),
    Case('seg-eval-a-classifier', lambda w: ['seg', 'eval', '--checkpoint', w.cls_safetensors, '--data', w.ade],
         'is a classifier (cpolynext_lr), not a segmentor', '`polynext validate --checkpoint'),
    Case('seg-eval-a-classifier-state', lambda w: ['seg', 'eval', '--checkpoint', w.run_train + '/last.state.pt',
                                                   '--data', w.ade],
         'is a classifier (cpolynext_lr), not a segmentor', 'cpolynext_lr has no stride-4/8/16/32 stages, so it '
         'cannot be the backbone of a segmentor'),
    Case('seg-eval-json-under-a-file', lambda w: ['seg', 'eval', '--checkpoint', w.cls_safetensors, '--data', w.ade,
                                                  '--json', w.afile + '/m.json'],
         'cannot be written', 'pass a path whose parents are folders'),
    Case('seg-cost-unknown-recipe', lambda w: ['seg', 'cost', '--recipe', 'upernet_cpolynxt_s'],
         "unknown recipe 'upernet_cpolynxt_s'", 'Did you mean'),
    # ---- polynext det -------------------------------------------------------------------------------------------
    Case('det-train-missing-annotation-file', lambda w: DET + ['--data', w.coco_noann, '--output', w.root / 'run'],
         'missing annotation file', 'annotations/instances_{train,val}2017.json', needs='pycocotools'),
    Case('det-train-no-usable-annotation', lambda w: DET + ['--data', w.coco_crowd, '--output', w.root / 'run'],
         'no image has a usable (non-crowd, non-empty) annotation', 'check that the annotations belong to these images',
         needs='pycocotools'),
    Case('det-train-unknown-category', lambda w: DET + ['--data', w.coco_cat, '--output', w.root / 'run'],
         "has category_id 99, which 'categories' does not list", 'fix the category ids', needs='pycocotools'),
    Case('det-train-unlisted-image', lambda w: DET + ['--data', w.coco_img, '--output', w.root / 'run'],
         "refers to image id 12345, which 'images' does not list", 'fix the file', needs='pycocotools'),
    Case('det-train-backbone-without-four-stages', lambda w: DET + ['--data', w.coco, '--output', w.root / 'run',
                                                                    '--backbone', 'cpolynext_lr'],
         'needs strides [4, 8, 16, 32]', 'choose a four-stage backbone', needs='pycocotools'),
    Case('det-train-checkpoint-of-another-model',
         lambda w: DET + ['--data', w.coco, '--output', w.root / 'run', '--backbone', 'convformer_s18', '--set',
                          'backbone_kwargs={}', '--initial-checkpoint', w.cls_safetensors],
         'holds cpolynext_lr weights, not convformer_s18', 'pass --backbone cpolynext_lr', needs='pycocotools'),
    Case('det-train-weights-of-another-model',
         lambda w: DET + ['--data', w.coco, '--output', w.root / 'run', '--backbone', 'convformer_s18', '--set',
                          'backbone_kwargs={}', '--initial-checkpoint', w.ten_pth],
         'checkpoint does not match convformer_s18', 'must hold classification weights of convformer_s18',
         needs='pycocotools'),
    Case('det-train-needs-data', lambda w: ['det', 'train', '--recipe', 'maskrcnn_convformer_s18_3x'],
         'trains on COCO', 'pass --data PATH/COCO', needs='pycocotools'),
    Case('det-train-output-is-a-file', lambda w: DET + ['--data', w.coco, '--output', w.afile],
         'is a file, not a folder', 'pass a folder path', needs='pycocotools'),
    Case('det-train-unknown-recipe', lambda w: ['det', 'train', '--recipe', 'maskrcnn_convformer'],
         "unknown recipe 'maskrcnn_convformer'", '`polynext det train --list-recipes` lists them'),
    Case('det-train-bad-nonfinite-policy', lambda w: DET + ['--data', w.coco, '--set', 'on_nonfinite=ignore'],
         "bad value for 'on_nonfinite'", 'choose one of stop, skip, rollback'),
    Case('det-train-output-read-only', lambda w: DET + ['--data', w.coco, '--output', w.ro + '/run'],
         'the file system is read-only', 'pass --output a writable folder', setup=read_only('ro'),
         needs='pycocotools'),
    Case('det-train-no-disk-space', lambda w: DET + ['--data', w.coco, '--output', w.root / 'run'],
         'not enough disk space', 'free some space or pass --output a folder on another disk',
         setup=disk_free(1000), needs='pycocotools'),
    Case('det-train-resume-changes-the-backbone', lambda w: ['det', 'train', '--resume', w.run_det, '--backbone',
                                                             'convformer_s18'],
         "cannot change 'backbone' when resuming", 'A resumed run may change lr, weight_decay, clip_grad'),
    Case('det-train-resume-a-segmentation-run', lambda w: ['det', 'train', '--resume', w.run_seg],
         "is a 'polynext.seg/1' training state, not 'polynext.det/1'", 'resume it with the command that wrote it'),
    Case('det-eval-truncated-safetensors', lambda w: ['det', 'eval', '--checkpoint', w.truncated_det_safetensors,
                                                      '--data', w.coco],
         'the file is truncated or corrupt', 'copy it again'),
    Case('det-eval-other-categories', lambda w: ['det', 'eval', '--checkpoint', w.det_safetensors, '--data',
                                                 w.coco_shifted, '--output', w.root / 'eval'],
         'the checkpoint was trained on 3 categories', 'evaluate on the dataset it was trained on',
         needs='pycocotools'),
    Case('det-eval-a-classifier', lambda w: ['det', 'eval', '--checkpoint', w.cls_safetensors, '--data', w.coco],
         'is a classifier (cpolynext_lr), not a detector', '`polynext validate --checkpoint',
         check=lambda line: 'det train' not in line, needs='pycocotools'),
    Case('det-eval-a-four-stage-classifier', lambda w: ['det', 'eval', '--checkpoint', w.cls_t_safetensors, '--data',
                                                        w.coco],
         'is a classifier (cpolynext_t), not a detector',
         '`polynext det train --backbone cpolynext_t --initial-checkpoint ', needs='pycocotools'),
    Case('det-eval-checkpoint-not-found', lambda w: ['det', 'eval', '--checkpoint', w.nope_pt, '--data', w.coco],
         'checkpoint not found', 'check the path', needs='pycocotools'),
    Case('det-eval-output-is-a-file', lambda w: ['det', 'eval', '--checkpoint', w.det_safetensors, '--data', w.coco,
                                                 '--output', w.afile],
         'is a file, not a folder', 'pass a folder path'),
    Case('det-cost-json-under-a-file', lambda w: ['det', 'cost', '--json', w.afile + '/c.json'],
         'cannot be written', 'pass a path whose parents are folders'),
    # ---- polynext robustness -------------------------------------------------------------------------------------
    Case('robustness-checkpoint-count', lambda w: ['robustness', '--model', 'cpolynext_t', 'cpolynext_s',
                                                   '--checkpoint', w.cls_safetensors, '--imagenet-a', w.data],
         '2 model(s) but 1 checkpoint(s)', 'give one --checkpoint per --model'),
    Case('robustness-nothing-to-evaluate', lambda w: ['robustness', '--model', 'cpolynext_t', '--checkpoint',
                                                      w.cls_safetensors, '--output', w.root / 'rob'],
         'nothing to evaluate', 'pass at least one of --imagenet-c'),
    Case('robustness-folder-not-found', lambda w: ['robustness', '--model', 'cpolynext_t', '--checkpoint',
                                                   w.cls_safetensors, '--imagenet-r', w.nope, '--output', w.root / 'rob'],
         'folder not found', 'expected DIR/<wnid>/<image>'),
    Case('robustness-output-is-a-file', lambda w: ['robustness', '--model', 'cpolynext_t', '--checkpoint',
                                                   w.cls_safetensors, '--imagenet-r', w.data, '--output', w.afile],
         'is a file, not a folder', 'pass a folder path'),
    Case('robustness-unknown-model', lambda w: ['robustness', '--model', 'cpolynext_q', '--imagenet-r', w.data],
         "unknown model 'cpolynext_q'", 'Did you mean', check=distinct_suggestions),
    Case('robustness-batch-size', lambda w: ['robustness', '--model', 'cpolynext_t', '--batch-size', '0'],
         '--batch-size must be at least 1', 'got 0'),
    # ---- polynext bench ----------------------------------------------------------------------------------------------
    Case('bench-unknown-model', lambda w: ['bench', 'cpolynext_x', '--no-progress'],
         "unknown model 'cpolynext_x'", 'Did you mean', check=distinct_suggestions),
    Case('bench-unknown-device', lambda w: ['bench', 'cpolynext_t', '--device', 'tpu'],
         "unknown device 'tpu'", 'use auto, cpu, cuda or cuda:N'),
    Case('bench-no-warm-up', lambda w: ['bench', 'cpolynext_t', '--warmup', '0'],
         'warmup must be at least 1', 'one warm-up call is needed'),
    Case('bench-model-kwargs-syntax', lambda w: ['bench', 'cpolynext_t', '--model-kwargs', 'init_channels'],
         "model kwarg 'init_channels' is not KEY=VALUE", 'for example init_channels=8'),
    Case('bench-model-kwargs-target', lambda w: ['bench', 'cpolynext_t', '--model-kwargs', 'resnet18:depth=3'],
         'names resnet18, which is not among the models benchmarked', 'cpolynext_t'),
    Case('bench-json-under-a-file', lambda w: ['bench', 'cpolynext_t', '--json', w.afile + '/r.json'],
         'cannot be written', 'pass a path whose parents are folders'),
    Case('bench-plot-is-a-folder', lambda w: ['bench', 'cpolynext_t', '--plot', w.emptydir],
         'is a folder', 'pass a file path'),
    # ---- polynext profile --------------------------------------------------------------------------------------------
    Case('profile-unknown-model', lambda w: ['profile', 'cpolynext_x'],
         "unknown model 'cpolynext_x'", 'Did you mean', check=distinct_suggestions),
    Case('profile-json-is-a-folder', lambda w: ['profile', 'cpolynext_t', '--json', w.emptydir],
         'is a folder', 'pass a file path'),
    Case('profile-negative-top', lambda w: ['profile', 'cpolynext_t', '--top', '-1'],
         '--top must be 0 (no operator list) or more', 'got -1'),
    Case('profile-unknown-device', lambda w: ['profile', 'cpolynext_t', '--device', 'tpu'],
         "unknown device 'tpu'", 'use auto, cpu, cuda or cuda:N'),
    # ---- polynext ablate ---------------------------------------------------------------------------------------------
    Case('ablate-unknown-row', lambda w: ['ablate', '--rows', 'nosuchrow'],
         "unknown ablation row 'nosuchrow'", '`polynext ablate --list-rows` lists them'),
    Case('ablate-no-seeds', lambda w: ['ablate', '--seeds', '0'],
         '--seeds must be at least 1', 'got 0'),
    # ---- polynext export ---------------------------------------------------------------------------------------------
    Case('export-unknown-model', lambda w: ['export', 'cpolynext_q', w.root / 'x.onnx'],
         "unknown model 'cpolynext_q'", 'Did you mean', check=distinct_suggestions),
    Case('export-unknown-suffix', lambda w: ['export', 'cpolynext_t', w.root / 'x.txt'],
         "cannot tell the format from OUTPUT", 'name it .onnx or .pt2'),
    Case('export-unknown-format', lambda w: ['export', 'cpolynext_t', w.root / 'x.onnx', '--format', 'tflite'],
         "unknown format 'tflite'", 'use --format onnx, torch-export or hub'),
    Case('export-checkpoint-not-found', lambda w: ['export', 'cpolynext_t', w.root / 'x.onnx', '--checkpoint', w.nope_pt],
         'checkpoint not found', 'check the path'),
    Case('export-output-under-a-file', lambda w: ['export', 'cpolynext_t', w.afile + '/x.onnx'],
         'cannot be written', 'pass a path whose parents are folders'),
    Case('export-onto-its-input', lambda w: ['export', w.cls_safetensors, w.cls_safetensors, '--format', 'onnx'],
         'is the input file', 'pass another output path'),
    Case('export-json-is-a-folder', lambda w: ['export', 'cpolynext_t', w.root / 'x.onnx', '--json', w.emptydir],
         'is a folder', 'pass a file path'),
    Case('export-model-kwargs-not-a-mapping', lambda w: ['export', 'cpolynext_t', w.root / 'x.onnx', '--model-kwargs',
                                                         'init_channels'],
         '--model-kwargs must be a mapping', "like '{init_channels: 16}'"),
    # ---- polynext fhe ------------------------------------------------------------------------------------------------
    Case('fhe-analyze-unknown-model', lambda w: ['fhe', 'analyze', 'cpolynext_t_bm'],
         "unknown model 'cpolynext_t_bm'", 'Did you mean', check=distinct_suggestions),
    Case('fhe-analyze-checkpoint-not-found', lambda w: ['fhe', 'analyze', w.nope_pt],
         'checkpoint not found', 'check the path'),
    Case('fhe-analyze-without-metadata', lambda w: ['fhe', 'analyze', w.ten_pth],
         'has no polynext metadata', "pass a run folder's best.safetensors"),
    Case('fhe-analyze-not-polynomial', lambda w: ['fhe', 'analyze', w.cls_safetensors, '--no-bench'],
         'the model is not polynomial', 'use a fully polynomial bn variant'),
    Case('fhe-analyze-json-under-a-file', lambda w: ['fhe', 'analyze', 'cpolynext_t_bn', '--json', w.afile + '/r.json'],
         'cannot be written', 'pass a path whose parents are folders'),
    Case('fhe-analyze-plot-is-a-folder', lambda w: ['fhe', 'analyze', 'cpolynext_t_bn', '--plot', w.emptydir],
         'is a folder', 'pass a file path'),
    Case('fhe-demo-no-images', lambda w: ['fhe', 'demo', '--images', '0'],
         '--images must be between 1 and 360', 'got 0'),
    Case('fhe-demo-weights-not-found', lambda w: ['fhe', 'demo', '--weights', w.nope_pt],
         'weights not found', 'train them with `polynext fhe demo --train`'),
    Case('fhe-moonshot-json-is-a-folder', lambda w: ['fhe', 'moonshot', '--json', w.emptydir],
         'is a folder', 'pass a file path'),
    # ---- polynext models and the command itself ----------------------------------------------------------------
    Case('models-no-match', lambda w: ['models', 'zzzz', '--no-macs'],
         "no model name contains 'zzzz'", '`polynext models` lists them all'),
    Case('models-json-is-a-folder', lambda w: ['models', 'cpolynext_t', '--no-macs', '--json', w.emptydir],
         'is a folder', 'pass a file path'),
    Case('unknown-command', lambda w: ['trian'],
         "unknown command 'trian'. Did you mean 'train'?", 'Run `polynext --help` for the list'),
]
if not torch.cuda.is_available():
    CASES = [*CASES, Case('bench-no-cuda', lambda w: ['bench', 'cpolynext_t', '--device', 'cuda'],
                          'no CUDA device is available', '--device cpu')]


# ---------------------------------------------------------------------------------------------
# the workspace
# ---------------------------------------------------------------------------------------------

def _fake_state(fmt: str, config: dict, recipe: str) -> dict:
    """A training state as ``plan_run`` reads it (format, recipe, config, model, progress)."""
    return dict(format=fmt, recipe=recipe, config=config, model={}, epoch=0, iteration=0, global_step=0)


@pytest.fixture(scope='module')
def ws(tmp_path_factory) -> W:
    root = tmp_path_factory.mktemp('bad_inputs')
    w = W(root)
    make_image_folder(root / 'data', train_per_class=2, val_per_class=1, extra_val=0)
    (root / 'afile').write_text('not a folder')
    (root / 'emptydir').mkdir()
    (root / 'ro').mkdir()
    (root / 'noval' / 'train' / 'cat').mkdir(parents=True)
    (root / 'noclass' / 'train').mkdir(parents=True)
    (root / 'noclass' / 'val').mkdir()
    for split in ('train', 'val'):
        (root / 'noimage' / split / 'cat').mkdir(parents=True)
    make_image_folder(root / 'mismatch', train_per_class=1, val_per_class=1, extra_val=0)
    (root / 'mismatch' / 'train' / 'class_3').rename(root / 'mismatch' / 'train' / 'dog')
    shutil.rmtree(root / 'mismatch' / 'val' / 'class_3')
    (root / 'bad.yaml').write_text('lr: 0.1\nepochs: [1, 2\n')
    (root / 'garbage.pt').write_bytes(b'this is not a checkpoint' * 8)
    (root / 'noise.pt').write_bytes(bytes([250]) + bytes(range(256)))   # not a pickle: 250 is no opcode
    torch.save({'a': Path('.')}, root / 'objects.pt')
    model = polynext.create_model('cpolynext_lr', num_classes=4, init_channels=8)
    meta = dict(format='polynext', architecture='cpolynext_lr', model_kwargs=dict(init_channels=8),
                classes=[f'class_{c}' for c in range(4)])
    save_safetensors(model.state_dict(), root / 'cls.safetensors', metadata=meta)
    save_safetensors(model.state_dict(), root / 'abcd.safetensors', metadata=dict(meta, classes=list('abcd')))
    save_safetensors({'w': torch.zeros(1)}, root / 'cls_t.safetensors', metadata=dict(meta, architecture='cpolynext_t'))
    blob = (root / 'cls.safetensors').read_bytes()
    (root / 'truncated.safetensors').write_bytes(blob[:len(blob) // 2])
    torch.save(polynext.create_model('cpolynext_lr', num_classes=10, init_channels=8).state_dict(), root / 'ten.pth')
    torch.save(torch.nn.Linear(3, 2).state_dict(), root / 'linear.pth')
    save_safetensors({'w': torch.zeros(2)}, root / 'seg.safetensors',
                     metadata=dict(polynext_segmentor=dict(backbone='cpolynext_t', num_classes=4)))
    seg_blob = (root / 'seg.safetensors').read_bytes()
    (root / 'truncated_seg.safetensors').write_bytes(seg_blob[:len(seg_blob) - 3])
    # a classification run (lr 0.5) and a segmentation run, as plan_run reads them
    from polynext.seg import SEG_PRESETS
    from polynext.train import PRESETS
    name, cfg = PRESETS.resolve('cpolynext_lr_digits', flags=dict(data=str(root / 'data'),
                                                                  output=str(root / 'run_train')),
                                set_items=['model_kwargs={init_channels: 8}', 'lr=0.5', 'batch_size=8',
                                           'device_batch_size=8', 'workers=0', 'epochs=1'])
    (root / 'run_train').mkdir()
    torch.save(_fake_state('polynext.train/1', config_to_dict(cfg), name), root / 'run_train' / 'last.state.pt')
    (root / 'run_seg').mkdir()
    torch.save(_fake_state('polynext.seg/1', config_to_dict(SEG_PRESETS.get('upernet_shapes_demo').config),
                           'upernet_shapes_demo'), root / 'run_seg' / 'last.state.pt')
    (root / 'run_truncated').mkdir()
    state = (root / 'run_train' / 'last.state.pt').read_bytes()
    (root / 'run_truncated' / 'last.state.pt').write_bytes(state[:len(state) // 2])
    from polynext.seg.synthetic import write_ade20k_folder
    write_ade20k_folder(root / 'ade', num_train=2, num_val=1, size=32)
    (root / 'ade_noann' / 'images' / 'training').mkdir(parents=True)
    write_ade20k_folder(root / 'ade_mismatch', num_train=2, num_val=1, size=32)
    (root / 'ade_mismatch' / 'annotations' / 'training' / 'ADE_train_00000001.png').unlink()
    _coco_folders(root)
    return w


def _coco_folders(root: Path) -> None:
    """A generated COCO folder, copies of it with edited training annotations, and a detector's description."""
    import json
    from polynext.det.recipes import DET_PRESETS
    from polynext.det.synthetic import write_coco_folder
    coco = write_coco_folder(root / 'coco', num_train=4, num_val=2, size=48)

    def edited(name, edit=None, split='train'):
        folder = root / name
        (folder / 'annotations').mkdir(parents=True)
        for s in ('train', 'val'):
            (folder / f'{s}2017').symlink_to(coco / f'{s}2017')
            d = json.loads((coco / 'annotations' / f'instances_{s}2017.json').read_text())
            if s == split and edit is not None:
                edit(d)
            (folder / 'annotations' / f'instances_{s}2017.json').write_text(json.dumps(d))
        return folder

    def crowd_only(d):
        d['annotations'] = [a for a in d['annotations'] if a['iscrowd']]

    def unknown_category(d):
        d['annotations'][0]['category_id'] = 99

    def unlisted_image(d):
        d['annotations'][0]['image_id'] = 12345

    def shifted(d):
        for c in d['categories']:
            c['id'] += 100
        for a in d['annotations']:
            a['category_id'] += 100
    (edited('coco_noann') / 'annotations' / 'instances_train2017.json').unlink()
    edited('coco_crowd', crowd_only)
    edited('coco_cat', unknown_category)
    edited('coco_img', unlisted_image)
    edited('coco_shifted', shifted, split='val')
    cfg = DET_PRESETS.get('maskrcnn_shapes_demo').config      # a detector's description, as det train writes it
    save_safetensors({'x': torch.zeros(1)}, root / 'det.safetensors', metadata=dict(
        polynext_det_config=json.dumps(config_to_dict(cfg)), category_ids=json.dumps([1, 3, 7])))
    blob = (root / 'det.safetensors').read_bytes()
    (root / 'truncated_det.safetensors').write_bytes(blob[:len(blob) - 3])
    (root / 'run_det').mkdir()                               # a detection run, as plan_run reads it
    torch.save(_fake_state('polynext.det/1', config_to_dict(cfg), 'maskrcnn_shapes_demo'),
               root / 'run_det' / 'last.state.pt')


def _snapshot(*folders: Path) -> dict:
    """Every path under ``folders`` with its size and modification time."""
    out = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for n in dirnames + filenames:
                p = Path(dirpath) / n
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _param(case: Case):
    if case.needs is None:
        return pytest.param(case, id=case.id)
    try:
        __import__(case.needs)
        return pytest.param(case, id=case.id)
    except ImportError:
        return pytest.param(case, id=case.id, marks=pytest.mark.skip(reason=f'needs {case.needs}'))


@pytest.mark.parametrize('case', [_param(c) for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(case: Case, ws: W, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)              # default outputs (runs/..., validate-..., robustness/) would land here
    if case.setup is not None:
        case.setup(ws, monkeypatch)
    argv = [str(a) for a in case.argv(ws)]
    before = _snapshot(ws.root, tmp_path)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert code == case.code, (code, out, err)
    assert len(lines) == 1, out + err
    line = lines[0]
    assert re.match(r'polynext( [a-z]+)?: error: ', line) and 'Traceback' not in line, line
    assert case.problem in line, line
    assert case.fix in line, line
    if case.check is not None:
        case.check(line)
    assert _snapshot(ws.root, tmp_path) == before, 'something was written'
    assert not list(tmp_path.iterdir())


def test_there_are_at_least_forty_cases_across_the_commands():
    commands = {c.argv(W(Path('/x')))[0] for c in CASES}
    assert len(CASES) >= 40 and {'train', 'validate', 'convert', 'robustness', 'seg', 'bench', 'models',
                                 'det', 'fhe', 'export', 'profile', 'ablate'} <= commands
    assert len({c.id for c in CASES}) == len(CASES)
