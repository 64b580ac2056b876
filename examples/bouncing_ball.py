"""Learn a ball's restitution from observed bounce times: events with exact gradients.

Balls dropped from different heights bounce on the ground; what is observed is the time of each
of their first bounces. The model is free fall (y'' = -g) with the restitution r (the speed kept
at a bounce) unknown. Each bounce is an event (odeint_event: the height reaches zero), the state
after it is (0, -r v), and the next fall starts there: a chain of events whose times depend on
r through every earlier bounce. Gradient descent on the squared error of the predicted bounce
times recovers r; the gradient goes through every event time (the implicit-function relation at
each event, combined with the discrete adjoint of the steps before it).

    .venv/bin/python examples/bouncing_ball.py
    mpiexec -n 2 .venv/bin/python examples/bouncing_ball.py --balls 8

Each rank simulates its own share of the balls (comm='self': one ball's events stop only its
own solve); the restitution's gradient is summed over the ranks (allreduce_gradients), so every
rank takes the same step. Prints the loss and the restitution (rank 0).
"""
import argparse
import math

import torch

from pnode_dist import allreduce_gradients, odeint_event
from pnode_dist.parallel import MPI

GRAVITY = 9.81
TRUE_RESTITUTION = 0.75
F64 = torch.float64


def fall(t, state):
    height, speed = state
    return speed, torch.full_like(speed, -GRAVITY)


def hits_ground(t, state):
    return state[0]


def bounce_times(height, restitution, bounces):
    """The times of the first `bounces` bounces of a ball dropped at rest from `height`."""
    state = (height.reshape(1), torch.zeros(1, dtype=F64))
    t0, times = torch.tensor(0.0, dtype=F64), []
    for _ in range(bounces):
        t0, (heights, speeds) = odeint_event(fall, state, t0, event_fn=hits_ground,
                                             rtol=1e-9, atol=1e-11, comm="self")
        times.append(t0)
        # Just above the ground (so that the next fall does not start on its event), going up.
        state = (torch.full((1,), 1e-12, dtype=F64), -restitution * speeds[-1])
    return torch.stack(times)


def observed(height, bounces):
    """Bounce times of the true ball, in closed form: sqrt(2h/g), then 2 v_k / g apart."""
    speed = math.sqrt(2 * GRAVITY * height)
    times, t = [], math.sqrt(2 * height / GRAVITY)
    for k in range(bounces):
        times.append(t)
        t += 2 * speed * TRUE_RESTITUTION ** (k + 1) / GRAVITY
    return torch.tensor(times, dtype=F64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--balls", type=int, default=4)
    parser.add_argument("--bounces", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    heights = torch.linspace(1.0, 5.0, args.balls, dtype=F64)
    mine = heights[rank::size]
    targets = [observed(float(h), args.bounces) for h in mine]
    logit = torch.tensor(0.0, dtype=F64, requires_grad=True)     # restitution 0.5 at first
    optimizer = torch.optim.Adam([logit], lr=args.lr)
    for iteration in range(args.iterations + 1):
        optimizer.zero_grad()
        restitution = torch.sigmoid(logit)
        loss = sum(((bounce_times(h, restitution, args.bounces) - target) ** 2).sum()
                   for h, target in zip(mine, targets)) / args.balls
        loss = loss if torch.is_tensor(loss) else torch.zeros((), dtype=F64, requires_grad=True)
        loss.backward()
        allreduce_gradients([logit], comm)
        total = comm.allreduce(float(loss.detach()))
        if rank == 0 and iteration % 10 == 0:
            print(f"iteration {iteration:3d}  loss {total:.3e}  restitution "
                  f"{float(restitution):.4f} (true {TRUE_RESTITUTION})", flush=True)
        if iteration < args.iterations:
            optimizer.step()
    if rank == 0:
        print(f"learned restitution {float(torch.sigmoid(logit)):.4f}", flush=True)


if __name__ == "__main__":
    main()
