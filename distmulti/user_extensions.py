"""``train(..., extensions=[...])``: the caller's own Chainer extensions, checked before training.

Each item is one of:

- an extension (a ``chainer.training.Extension``, or any callable ``f(trainer)``; its own
  ``trigger``, ``priority`` and ``name`` attributes apply, as with ``Trainer.extend``);
- a pair ``(extension, trigger)``, trigger as ``Trainer.extend`` takes it: ``(N, 'iteration')``,
  ``(N, 'epoch')`` or a trigger object;
- a dict of ``Trainer.extend``'s arguments: ``extension`` (required), ``trigger``,
  ``priority``, ``name``, ``call_before_training``, and distmulti's ``root_only``.

Extensions run on every rank (an extension may then use collectives, as evaluators do), after
distmulti's own extensions of the same priority; ``root_only=True`` registers one on rank 0
alone (for one that writes files or prints). Inside, ``trainer.updater.comm.rank`` and
``.size`` say where it runs.
"""
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

from distmulti.errors import ConfigError

EXTEND_KEYS = ('name', 'trigger', 'priority', 'call_before_training')
_UNITS = ('iteration', 'epoch')


@dataclasses.dataclass(frozen=True)
class ExtensionSpec:
    """One user extension: what ``Trainer.extend`` gets, and whether only rank 0 gets it."""

    extension: Any
    kwargs: Dict[str, Any]
    root_only: bool = False


def normalize(items: Optional[Sequence[Any]]) -> List[ExtensionSpec]:
    """The items of ``train(..., extensions=items)`` as specs; ConfigError names a bad one."""
    if items is None:
        return []
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise ConfigError(f'extensions must be a list of extensions, (extension, trigger) '
                          f'pairs or dicts of Trainer.extend arguments, got '
                          f'{type(items).__name__}')
    return [_spec(i, item) for i, item in enumerate(items)]


def _spec(i: int, item: Any) -> ExtensionSpec:
    where = f'extensions[{i}]'
    root_only = False
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - set(EXTEND_KEYS) - {'extension', 'root_only'})
        if unknown or 'extension' not in item:
            raise ConfigError(f'{where} is a dict with keys {sorted(item)}; it needs '
                              f'"extension" and may have {", ".join(EXTEND_KEYS)}, root_only')
        extension = item['extension']
        kwargs = {key: item[key] for key in EXTEND_KEYS if key in item}
        root_only = item.get('root_only', False)
        if not isinstance(root_only, bool):
            raise ConfigError(f'{where}["root_only"] must be true or false, got {root_only!r}')
    elif isinstance(item, tuple):
        if len(item) != 2:
            raise ConfigError(f'{where} is a tuple of {len(item)} items; give (extension, '
                              f'trigger)')
        extension, kwargs = item[0], {'trigger': item[1]}
    else:
        extension, kwargs = item, {}
    if not callable(extension):
        raise ConfigError(f'{where}: an extension must be callable as f(trainer) (a '
                          f'chainer.training.Extension), got {type(extension).__name__}')
    if 'trigger' in kwargs:
        _check_trigger(where, kwargs['trigger'])
    priority = kwargs.get('priority')
    if priority is not None and (isinstance(priority, bool)
                                 or not isinstance(priority, (int, float))):
        raise ConfigError(f'{where}: priority must be a number (e.g. '
                          f'chainer.training.PRIORITY_WRITER), got {priority!r}')
    return ExtensionSpec(extension, kwargs, root_only)


def _check_trigger(where: str, trigger: Any) -> None:
    if trigger is None or callable(trigger):
        return
    ok = (isinstance(trigger, (tuple, list)) and len(trigger) == 2
          and isinstance(trigger[0], (int, float)) and not isinstance(trigger[0], bool)
          and trigger[0] > 0 and trigger[1] in _UNITS)
    if not ok:
        raise ConfigError(f'{where}: trigger must be (N, "iteration"), (N, "epoch") with N > 0, '
                          f'or a trigger object, got {trigger!r}')


def register(trainer, specs: Sequence[ExtensionSpec], is_root: bool) -> None:
    """Adds the specs' extensions to ``trainer`` (root-only ones on rank 0 alone)."""
    for spec in specs:
        if is_root or not spec.root_only:
            trainer.extend(spec.extension, **spec.kwargs)
