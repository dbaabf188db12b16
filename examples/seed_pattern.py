"""The hand-written "one base CNN, a list of classifiers, one optimizer each" pattern, trained
by distmulti. One process:   python examples/seed_pattern.py [OUT] [ITERATIONS]
                 MPI:        mpiexec -n 2 python -m mpi4py examples/seed_pattern.py
"""
import sys

import distmulti  # first: it makes chainer import on numpy 2
import chainer
import chainer.functions as F
import chainer.links as L


# --- the user's existing code: a base CNN and one linear classifier per digit position ---
class BaseCNN(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(1, 16, ksize=3, pad=1)
            self.fc = L.Linear(None, 128)

    def forward(self, x):
        return F.relu(self.fc(F.max_pooling_2d(F.relu(self.conv(x)), 2)))


base_cnn = BaseCNN()
classifiers = [L.Linear(128, 10) for _ in range(3)]
optimizers = {'base': chainer.optimizers.Adam(alpha=1e-3)}
optimizers.update({f'head{i}': chainer.optimizers.MomentumSGD(lr=0.05) for i in range(3)})

# --- distmulti replaces the hand-written StandardUpdater subclass and its training loop ---
config = distmulti.TrainConfig(
    out=sys.argv[1] if len(sys.argv) > 1 else 'result/seed_pattern',
    iterations=int(sys.argv[2]) if len(sys.argv) > 2 else 600, plot=False)
result = distmulti.train(config, base=base_cnn, heads=classifiers, optimizers=optimizers)
