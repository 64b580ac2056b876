"""The cotangents the adjoint adds at the positions of a forward record (an output's own, and
those of outputs interpolated inside a step, through the step's dense output)."""
import torch


class Cotangents:
    """The cotangents the adjoint adds at the positions of a forward record: an output's own
    at the step it ended on; those of outputs interpolated inside step n, through the step's
    dense output, at n (their parameter part into the adjoint Integrator's mu)."""

    def __init__(self, integrator, record, grad_outputs):
        self.integrator, self.record, self.grad_outputs = integrator, record, grad_outputs
        self.by_position = {}
        for k, pos in enumerate(record.output_steps):
            self.by_position.setdefault(pos, []).append(k)
        self._dense = {}             # position -> dL/dy of its interpolated outputs, computed

    def _request(self, pos):
        """(out_times, grads) of the outputs interpolated in step pos, or None."""
        ks = [k for k in self.by_position.get(pos, []) if self.record.dense_times[k] is not None]
        if not ks:
            return None
        return [self.record.dense_times[k] for k in ks], self.grad_outputs[ks]

    def positions_below(self, hi, lo):
        """The output positions p with lo < p < hi, from the highest."""
        return sorted((p for p in self.by_position if lo < p < hi), reverse=True)

    def at(self, pos):
        """dL/dy at position pos (zeros if no output is there); call once per position."""
        ks = self.by_position.get(pos, [])
        grad = torch.zeros_like(self.grad_outputs[0])
        for k in ks:
            if self.record.dense_times[k] is None:
                grad += self.grad_outputs[k]
        request = self._request(pos)
        if request is not None:
            if pos not in self._dense:
                # This step, and every step whose stage graphs the forward kept: together.
                requests = {n: self._request(n) for n in self.record.stage_graphs
                            if n not in self._dense and n != pos}
                requests = {n: r for n, r in requests.items() if r is not None}
                requests[pos] = request
                self._dense.update(self.integrator.step_cotangents(self.record, requests))
            grad += self._dense.pop(pos)
        return grad
