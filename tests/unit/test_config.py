"""TrainConfig: defaults, YAML, precedence of flags, and one clear error per bad value."""
import dataclasses

import pytest

from distmulti.cli import build_parser, config_from_args, parse_args
from distmulti.config import TrainConfig, normalize_device
from distmulti.errors import ConfigError


def test_defaults_are_valid_and_train_three_heads_for_four_epochs_with_warmup_and_cosine():
    config = TrainConfig().validate()
    assert config.heads == 3 and config.stop_trigger == (4, 'epoch')
    assert config.optimizer_names == ['base', 'head0', 'head1', 'head2']
    assert (config.lr, config.warmup, config.lr_decay, config.accumulate) == (
        2e-3, 50, 'cosine', 1)


@pytest.mark.parametrize('spec,expected', [
    ('-1', '@numpy'), (-1, '@numpy'), ('@numpy', '@numpy'), ('0', '@cupy:0'), (1, '@cupy:1'),
    ('@cupy:2', '@cupy:2'), ('@intel64', '@intel64')])
def test_device_specs_in_chainer_example_style(spec, expected):
    assert normalize_device(spec) == expected


@pytest.mark.parametrize('values,message', [
    ({'heads': 0}, 'heads must be an integer >= 1, got 0'),
    ({'batchsize': 0}, 'batchsize must be an integer >= 1, got 0'),
    ({'batchsize': 2.5}, 'batchsize must be an integer >= 1, got 2.5'),
    ({'device': 'gpu0'}, "unknown device 'gpu0'; allowed: -1 or @numpy"),
    ({'device': '@cupy:x'}, "unknown device '@cupy:x'"),
    ({'lr': -1.0}, 'lr must be a finite number > 0, got -1.0'),
    ({'optimizer': 'adamw'}, "optimizer must be one of adadelta, adagrad, adam"),
    ({'backward': 'twice'}, "backward must be one of fused, per_loss, got 'twice'"),
    ({'loss_weights': [1, 1]}, 'loss_weights must hold one number per head (3)'),
    ({'freeze': [3]}, 'freeze lists head 3, but heads are numbered 0..2'),
    ({'optimizers': {'head7': {'lr': 0.1}}}, "optimizers has an entry for 'head7'"),
    ({'optimizers': {'head0': {'rate': 0.1}}}, "optimizers['head0'] must be a mapping"),
    ({'epoch': 0}, 'epoch must be an integer >= 1, got 0'),
    ({'warmup': -1}, 'warmup must be an integer >= 0, got -1'),
    ({'lr_decay': 'linear'}, "lr_decay must be one of constant, step, exponential, cosine, "
                             "got 'linear'"),
    ({'lr_decay': 'step'}, 'lr_decay step needs lr_step (iterations per factor lr_gamma), '
                           'which is not set'),
    ({'lr_floor': 1.5}, 'lr_floor is a fraction of the peak rate and must be between 0 and 1, '
                        'got 1.5'),
    ({'lr_gamma': 0}, 'lr_gamma must be a finite number > 0, got 0'),
    ({'weight_decay': -0.1}, 'weight_decay must be >= 0, got -0.1'),
    ({'grad_clip': 0}, 'grad_clip must be a finite number > 0, got 0'),
    ({'accumulate': 0}, 'accumulate must be an integer >= 1, got 0'),
    ({'lr_scaling': 'sqrt'}, "lr_scaling must be one of none, linear, got 'sqrt'"),
    ({'lr_reference_batch': 0}, 'lr_reference_batch must be an integer >= 1, got 0'),
    ({'optimizers': {'head1': {'lr_decay': 'exponential'}}},
     "optimizers['head1'].lr_decay exponential needs lr_step"),
    ({'optimizers': {'base': {'warmup': 2.5}}},
     "optimizers['base'].warmup must be an integer >= 0, got 2.5"),
    ({'optimizers': {'head0': {'momentum': 0.9}}},
     "optimizers['head0'] must be a mapping with keys type and/or lr and/or warmup"),
    ({'grad_dtype': 'bfloat16'}, "grad_dtype must be one of float32, float16, got 'bfloat16'"),
    ({'grad_dtype': 'float16'}, "grad_dtype float16 needs GPUs: only ChainerMN's pure_nccl "
                                "communicator exchanges float16, and on the CPU its naive "
                                "communicator exchanges float32 only; this run is on the CPU "
                                "(device @numpy)"),
    ({'grad_dtype': 'float16', 'device': '@cupy:0', 'communicator': 'non_cuda_aware'},
     "grad_dtype float16 needs the pure_nccl communicator (ChainerMN's non_cuda_aware exchanges "
     "float32 only)"),
    ({'sync_bn': 'yes'}, "sync_bn must be true or false, got 'yes'"),
    ({'loader_workers': -1}, 'loader_workers must be an integer >= 0, got -1'),
    ({'eval_batchsize': 0}, 'eval_batchsize must be an integer >= 1, got 0'),
    ({'image_size': '64'}, "image_size: image size '64' is not WIDTHxHEIGHT with both at "
                           "least 1, e.g. 64x64"),
    ({'image_size': '0x5'}, "image size '0x5' is not WIDTHxHEIGHT"),
    ({'dataset': 'h5:x.h5'}, "dataset must be npz:PATH, npy:DIR or csv:PATH, got 'h5:x.h5'"),
])
def test_each_bad_value_gets_a_sentence_naming_it(values, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_mapping(values).validate()
    assert message in str(info.value)


def test_the_data_loading_flags_parse_and_may_change_on_resume():
    config = config_from_args(parse_args(['train', '--loader-workers', '0', '--eval-batchsize',
                                          '7', '--image-size', '32x16', '--dataset', 'npy:d']))
    assert (config.loader_workers, config.eval_batchsize, config.image_size) == (0, 7, '32x16')
    free = TrainConfig.resume_free_keys()
    assert {'loader_workers', 'eval_batchsize'} <= free and 'image_size' not in free


def test_unknown_keys_are_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size' in config "
                                          r"\(did you mean 'batchsize'\?\); allowed keys: "):
        TrainConfig.from_mapping({'batch_size': 3})


def test_yaml_file_then_flags_override(tmp_path):
    path = tmp_path / 'run.yaml'
    path.write_text('heads: 4\nbatchsize: 32\nepoch: 3\ncheckpoint-interval: 50\n'
                    'optimizers:\n  head0: {type: momentum_sgd, lr: 0.01}\n')
    config = config_from_args(parse_args(['train', '-c', str(path), '-b', '16',
                                          '--iterations', '100']))
    assert (config.heads, config.batchsize, config.checkpoint_interval) == (4, 16, 50)
    # A flag for one length replaces the file's other length.
    assert config.iterations == 100 and config.epoch is None
    assert config.optimizer_spec('head0')['type'] == 'momentum_sgd'
    assert config.optimizer_spec('head0')['lr'] == 0.01
    assert (config.optimizer_spec('base')['type'], config.optimizer_spec('base')['lr']) == (
        'adam', 2e-3)


def test_per_part_schedule_and_regularisation_override_the_flags(tmp_path):
    path = tmp_path / 'run.yaml'
    path.write_text('weight_decay: 0.0001\nlr_decay: step\nlr_step: 100\n'
                    'optimizers:\n  head1: {lr_decay: cosine, warmup: 0, grad_clip: 5.0}\n'
                    '  base: {lr_gamma: 0.5, lr_floor: 0.1, weight_decay: 0}\n')
    config = config_from_args(parse_args(['train', '-c', str(path), '--warmup', '20',
                                          '--grad-clip', '1']))
    head1, base, head0 = (config.optimizer_spec(n) for n in ('head1', 'base', 'head0'))
    assert (head1['lr_decay'], head1['warmup'], head1['grad_clip'], head1['lr_step']) == (
        'cosine', 0, 5.0, 100)
    assert (base['lr_gamma'], base['lr_floor'], base['weight_decay'], base['warmup']) == (
        0.5, 0.1, 0, 20)
    assert (head0['lr_decay'], head0['weight_decay'], head0['grad_clip']) == ('step', 1e-4, 1.0)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('heads: [1\n')
    with pytest.raises(ConfigError, match='is not valid YAML'):
        TrainConfig.from_yaml(str(bad))
    with pytest.raises(ConfigError, match='cannot read config file'):
        TrainConfig.from_yaml(str(tmp_path / 'missing.yaml'))
    listing = tmp_path / 'list.yaml'
    listing.write_text('- 1\n- 2\n')
    with pytest.raises(ConfigError, match='must be a mapping of option names'):
        TrainConfig.from_yaml(str(listing))


def _train_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == 'command')
    return sub.choices['train']


def test_every_config_field_with_a_flag_is_a_train_flag_with_its_default_in_the_help():
    actions = {a.dest: a for a in _train_parser()._actions}
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if not field.metadata['flag']:
            assert field.name not in actions
            continue
        action = actions[field.name]
        assert f'--{field.name.replace("_", "-")}' in action.option_strings
        assert action.default is None  # only flags given override the config file
        if field.metadata['show_default']:
            assert f'(default: {getattr(defaults, field.name)})' in action.help, field.name


def test_flags_parse_to_the_field_types_and_booleans_go_both_ways():
    config = config_from_args(parse_args(['train', '--lr', '0.5', '--seed', '3', '--no-plot',
                                          '--loss-weights', '1,0.5,2', '--freeze', '0,2']))
    assert (config.lr, config.seed, config.plot) == (0.5, 3, False)
    assert config.loss_weights == [1.0, 0.5, 2.0] and config.freeze == [0, 2]
    assert config_from_args(parse_args(['train', '--plot'])).plot is True
    with pytest.raises(SystemExit):  # epoch and iterations exclude each other
        parse_args(['train', '--epoch', '1', '--iterations', '5'])


def test_resume_free_keys_come_from_the_field_definitions():
    free = TrainConfig.resume_free_keys()
    assert {'out', 'resume', 'epoch', 'iterations', 'checkpoint_interval',
            'keep_checkpoints', 'hang_timeout', 'progress', 'plot'} <= free
    assert not {'lr', 'seed', 'heads', 'batchsize', 'optimizer', 'dataset'} & free
