"""TensorBoard tags: metric first, head second, one run per split."""
import pytest

from distmulti.tensorboard import tag_for

HEADS = ['head0', 'left', 'loss']


@pytest.mark.parametrize('key,where', [
    ('main/head0/loss', ('train', 'loss/head0')),
    ('main/left/accuracy', ('train', 'accuracy/left')),
    ('validation/main/left/accuracy', ('validation', 'accuracy/left')),
    ('main/loss', ('train', 'loss/total')),
    ('validation/main/loss', ('validation', 'loss/total')),
    ('main/loss/loss', ('train', 'loss/loss')),  # a head named "loss"
    ('validation/main/accuracy_all', ('validation', 'accuracy/all_heads')),
    ('validation/main/samples', ('validation', 'samples/evaluated')),
    ('validation/main/accuracy_all_samples', ('validation', 'samples/accuracy_all')),
    ('lr/base', ('train', 'lr/base')),
    ('lr/head0', ('train', 'lr/head0')),
    ('time/samples_per_s', ('train', 'time/samples_per_s')),
    ('elapsed_time', ('train', 'time/elapsed_s')),
    ('epoch', ('train', 'progress/epoch')),
    ('main/other/thing', ('train', 'other/thing')),
    ('my_value', ('train', 'my_value')),
    ('iteration', None),
])
def test_tags(key, where):
    assert tag_for(key, HEADS) == where
