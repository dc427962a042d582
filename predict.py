"""Use a trained checkpoint: classify image files, or export the network to ONNX.

    python predict.py classify output/train/RUN/model_best.pth.tar photo.jpg photos/ [--topk 5] [--device auto]
    python predict.py export output/train/RUN/model_best.pth.tar model.onnx [--size 288]
    python predict.py classify --model efficientnetv2_rw_t photo.jpg photos/   # published ImageNet weights
    python predict.py classify --model tf_efficientnetv2_s.in21k_ft_in1k photo.jpg  # timm's VARIANT.TAG
    python predict.py export --model efficientnetv2_rw_t model.onnx

Both take the checkpoint's EMA weights when it holds them, and the run's evaluation settings (size,
crop_pct, interpolation, mean/std) from the arguments stored in it; --size overrides the size.
Without a checkpoint (classify: the first PATH is an image or a folder), --model NAME takes the
variant's published ImageNet weights, or VARIANT.TAG's (published.published_weights: downloaded once into
Hugging Face's or torch's cache), their eval transform and ImageNet's class names. Notes go to stderr.
`classify` prints one line per image (folders are searched recursively for .jpg/.jpeg/.png):
    photos/cat.jpg  tabby 91.20%  tiger_cat 6.31%  Egyptian_cat 1.94%  lynx 0.21%  tiger 0.09%
`export` writes one ONNX file taking normalized float images (N, 3, size, size), N free, giving
logits (N, classes); class names, mean/std and the eval transform are stored as metadata. It runs
the file with onnxruntime on random images, compares with PyTorch and prints the max difference
(exit status 1 above 1e-3). It needs onnx, onnxscript and onnxruntime (pip install onnx onnxscript onnxruntime).
A checkpoint of bare weights (timm, torchvision) needs --model NAME.
"""

import argparse
import os
import sys

import torch

import data  # first: it checks that torchvision fits this torch (errors.check_torchvision)
import devices
import distributed
import errors
import flags
import model as models
import published
import transforms
import weights
from checkpoint import read_checkpoint

EXPORT_TOLERANCE = 1e-3  # max |logit difference| between onnxruntime and PyTorch in float32


def load_model(path, model_name=None):
    """The network in eval mode on the CPU, and its info: arch, classes, size, crop_pct, interpolation, mean, std."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get('args') or {}
    arch = model_name or checkpoint.get('arch')
    if arch is None:
        raise errors.UsageError(f'{path} holds bare weights without a model name: give --model NAME')
    models.check_model_name(arch, error=errors.UsageError)
    num_classes = checkpoint.get('num_classes') or _classifier_rows(checkpoint)
    net = models.create_model(arch, num_classes=num_classes)
    for note in weights.load_pretrained(net, checkpoint, use_ema=True):
        print(note, file=sys.stderr)  # stdout is for results
    config = flags.model_config(arch)  # a VARIANT.TAG run (train.py --model): that tag's
    classes = checkpoint.get('classes') or [str(i) for i in range(num_classes)]
    info = dict(
        arch=arch,
        classes=list(classes),
        ema=bool(checkpoint.get('model_ema')),
        size=saved.get('eval_size') or saved.get('img_size') or config['test_size'],
        crop_pct=saved.get('crop_pct') or config['crop_pct'],
        interpolation=saved.get('interpolation') or config['interpolation'],
        mean=tuple(saved.get('mean') or config['mean']),
        std=tuple(saved.get('std') or config['std']),
    )
    return net.eval(), info


def load_published(name):
    """The network holding the published weights `name` means (VARIANT: its default, or VARIANT.TAG), in eval
    mode on the CPU, and its info as load_model's: the eval settings those weights were measured with and
    ImageNet-1k's class names (ImageNet-21k's 21,843 are numbered)."""
    models.check_model_name(name, error=errors.UsageError)
    tag = published.published_tag(name)  # CheckpointError, one line, for a variant without weights
    config = published.published_config(tag)
    publisher, num_classes = published.PUBLISHED_WEIGHTS[tag][:2]
    net = models.create_model(name, num_classes=num_classes)
    for note in weights.load_pretrained(net, read_checkpoint(published.published_weights(name))):
        print(note, file=sys.stderr)  # stdout is for results
    classes = imagenet_classes() if num_classes == 1000 else [str(i) for i in range(num_classes)]
    file = tag if publisher == 'timm' else published.TORCHVISION_FILES[tag]
    info = dict(
        arch=name,
        classes=classes,
        ema=False,
        published=f'{publisher}:{file}',
        size=config['test_size'],
        crop_pct=config['crop_pct'],
        interpolation=config['interpolation'],
        mean=config['mean'],
        std=config['std'],
    )
    return net.eval(), info


def imagenet_classes():
    """ImageNet-1k's class names in the order every published classifier uses (torchvision's list),
    with spaces as underscores so each name stays one word in classify's lines."""
    import torchvision

    categories = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1.meta['categories']
    return [name.replace(' ', '_') for name in categories]


def split_checkpoint(paths, model_name):
    """classify's PATHs as the checkpoint (or None) and the images: the first is the checkpoint unless it is an
    image or a folder; then --model NAME's published weights are used."""
    first = paths[0]
    if os.path.isdir(first) or first.lower().endswith(data.IMAGE_EXTENSIONS):
        if model_name is None:
            raise errors.UsageError(
                "give a checkpoint before the images, or --model NAME to use that variant's published ImageNet weights"
            )
        return None, paths
    if len(paths) == 1:
        raise errors.UsageError(f'no images given after the checkpoint {first}')
    return first, paths[1:]


def _classifier_rows(checkpoint):
    """The class count of bare weights: rows of the (possibly wrapped) classifier.weight."""
    for state in (checkpoint, checkpoint.get('state_dict_ema'), checkpoint.get('state_dict')):
        for key, value in (state or {}).items():
            if key.endswith('classifier.weight'):
                return value.shape[0]
    raise errors.UsageError("cannot find the classifier in the checkpoint: is it an EfficientNetV2's?")


# ----------------------------------------------------------------------------------------------
# classify


def find_images(folder):
    """Sorted paths of the images (data.IMAGE_EXTENSIONS) under folder, searched recursively; hidden entries skipped."""
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = [name for name in subdirectories if not name.startswith('.')]
        images = [name for name in files if not name.startswith('.') and name.lower().endswith(data.IMAGE_EXTENSIONS)]
        found += [os.path.join(directory, name) for name in images]
    return sorted(found)


def image_paths(paths):
    """Files as given; folders searched recursively for the extensions train.py reads (find_images)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += find_images(path)
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise errors.UsageError(f'{path} is neither an image file nor a folder')
    if not found:
        raise errors.UsageError(f'no images ({", ".join(data.IMAGE_EXTENSIONS)}) in {" ".join(paths)}')
    return found


@torch.no_grad()
def classify(net, info, paths, topk=5, device=None, batch_size=32):
    """Yield (path, [(class name, probability)] best first) per readable image; unreadable files
    are reported on stderr and skipped."""
    transform = transforms.eval_transform(info['size'], crop_pct=info['crop_pct'], interpolation=info['interpolation'])
    device = device or torch.device('cpu')
    net = net.to(device)
    topk = min(topk, len(info['classes']))
    for start in range(0, len(paths), batch_size):
        batch_paths = []
        images = []
        for path in paths[start : start + batch_size]:
            try:
                images.append(transform(data.read_image(path)))
                batch_paths.append(path)
            except data.UnreadableImage as error:
                print(f'warning: skipping unreadable image {path}: {error}', file=sys.stderr, flush=True)
        if not images:
            continue
        inputs = transforms.normalize(torch.stack(images).to(device), info['mean'], info['std'])
        probabilities = net(inputs).float().softmax(dim=1)
        values, indices = probabilities.topk(topk, dim=1)
        for path, row_values, row_indices in zip(batch_paths, values.tolist(), indices.tolist()):
            yield path, [(info['classes'][i], p) for i, p in zip(row_indices, row_values)]


# ----------------------------------------------------------------------------------------------
# export


def export_onnx(net, info, out_path, size=None, batch_size=2):
    """Write the ONNX file (batch dimension free), run it with onnxruntime on random images and
    return the max |difference| from PyTorch's logits."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export's dynamo exporter needs it)
    except ImportError:
        raise errors.UsageError(
            'export needs onnx, onnxscript and onnxruntime: pip install onnx onnxscript onnxruntime'
        ) from None
    size = size or info['size']
    generator = torch.Generator().manual_seed(0)  # the same check, the same number, every time
    example = torch.randn(batch_size, 3, size, size, generator=generator)
    batch = torch.export.Dim('batch', min=1)
    program = torch.onnx.export(
        net,
        (example,),
        input_names=['images'],
        output_names=['logits'],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    program.save(out_path)
    onnx_model = onnx.load(out_path)
    onnx.checker.check_model(onnx_model)
    metadata = dict(
        arch=info['arch'],
        classes='\n'.join(info['classes']),
        size=str(size),
        crop_pct=str(info['crop_pct']),
        interpolation=info['interpolation'],
        mean=' '.join(map(str, info['mean'])),
        std=' '.join(map(str, info['std'])),
        weights=info.get('published') or ('ema' if info['ema'] else 'model'),
    )
    onnx.helper.set_model_props(onnx_model, metadata)
    onnx.save(onnx_model, out_path)

    images = torch.randn(batch_size + 1, 3, size, size, generator=generator)  # another batch size
    session = onnxruntime.InferenceSession(out_path, providers=['CPUExecutionProvider'])
    onnx_logits = torch.from_numpy(session.run(['logits'], {'images': images.numpy()})[0])
    with torch.no_grad():
        torch_logits = net(images)
    return (onnx_logits - torch_logits).abs().max().item()


# ----------------------------------------------------------------------------------------------


def get_args_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n', 2)[2],
    )
    commands = p.add_subparsers(dest='command', required=True)
    c = commands.add_parser('classify', help='top-k classes of image files or folders')
    c.add_argument(
        'paths',
        nargs='+',
        metavar='PATH',
        help='a checkpoint, then image files or folders (no checkpoint: --model NAME)',
    )
    c.add_argument('--topk', type=int, default=5)
    c.add_argument('--device', default='auto', choices=('auto', 'cuda', 'npu', 'cpu'))
    c.add_argument('-b', '--batch-size', type=int, default=32)
    e = commands.add_parser('export', help='ONNX file, checked with onnxruntime')
    e.add_argument('checkpoint', nargs='?', help='omitted: --model NAME with its published weights')
    e.add_argument('output', metavar='OUT.onnx')
    for sub in (c, e):
        sub.add_argument('--size', type=int, help="input size; default: the run's eval size")
        sub.add_argument(
            '--model',
            help="model name, for checkpoints that don't store it; without a "
            'checkpoint, the variant whose published ImageNet weights to use',
        )
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with distributed.one_line_errors():
        if args.command == 'classify':
            args.checkpoint, args.paths = split_checkpoint(args.paths, args.model)
        if args.checkpoint is None and args.model is None:
            raise errors.UsageError('give a checkpoint, or --model NAME for its published ImageNet weights')
        if args.checkpoint is None:
            net, info = load_published(args.model)
        else:
            net, info = load_model(args.checkpoint, args.model)
        info['size'] = args.size or info['size']
        if args.command == 'classify':
            if args.topk < 1 or args.batch_size < 1:
                raise errors.UsageError('--topk and --batch-size must be positive')
            device = devices.select_device(args.device, 0)
            for path, top in classify(net, info, image_paths(args.paths), args.topk, device, args.batch_size):
                print(path + ''.join(f'  {name} {100 * p:.2f}%' for name, p in top), flush=True)
        else:
            difference = export_onnx(net, info, args.output, info['size'])
            if args.checkpoint is None:
                held = f'published weights {info["published"]}'
            else:
                held = 'EMA weights' if info['ema'] else 'weights (the checkpoint has no EMA)'
            print(
                f'exported {info["arch"]} to {args.output}: input N x 3 x {info["size"]} x '
                f'{info["size"]}, {len(info["classes"])} classes, {held}'
            )
            print(f'onnxruntime vs PyTorch: max difference {difference:.3g}')
            if difference > EXPORT_TOLERANCE:
                print(f'error: the ONNX model differs from PyTorch by more than {EXPORT_TOLERANCE}', file=sys.stderr)
                sys.exit(1)


if __name__ == '__main__':
    main()
