"""
logZ per condition (METHOD.md §11.2): a learned head on the prompt's representation, or the batch estimate
(VarGrad). conditions.py builds them into a run.
"""
import torch


def hidden_size(policy):
    return policy.model.get_input_embeddings().embedding_dim


class LogZHead(torch.nn.Module):
    """logZ(c) = w . h(c) + b, h(c) the policy's last hidden state at the end of c's prompt (METHOD.md §11.2).
    w starts at 0, so logZ(c) starts at b for every condition; a prompt never trained on still gets a value."""

    def __init__(self, size, init=0.0):
        super().__init__()
        self.linear = torch.nn.Linear(size, 1)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.fill_(init)

    def forward(self, states):
        return self.linear(states).squeeze(-1)


def batch_log_z(conditions, log_pf, log_pterm, log_r, lengths):
    """logZ(c) = the mean of log R(x) - log q(x) over the rows of condition c (detached), one value per row: at
    q = p* every term is log Z(c); under q it is log Z(c) - KL(q || p*) in expectation (METHOD.md §11.2)."""
    with torch.no_grad():
        tau = lengths[:, None]
        log_w = (log_r.gather(1, tau) - log_pterm.gather(1, tau)).squeeze(1) - torch.where(
            torch.arange(log_pf.shape[1], device=log_pf.device)[None] < tau, log_pf, 0.0).sum(1)
        index = {c: i for i, c in enumerate(dict.fromkeys(conditions))}
        group = torch.tensor([index[c] for c in conditions], device=log_w.device)
        sums = torch.zeros(len(index), dtype=log_w.dtype, device=log_w.device).index_add_(0, group, log_w)
        counts = torch.bincount(group, minlength=len(index)).to(log_w.dtype)
        return (sums / counts)[group]
