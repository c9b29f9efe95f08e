"""Separable CMA-ES (Ros and Hansen 2008): CMA-ES with a diagonal covariance, for GGL's
gradient-free latent search.

Written here because neither the `cma` package nor nevergrad is a gradleak dependency. The
diagonal covariance costs O(n) per candidate instead of full CMA-ES's O(n^2) (and an O(n^3)
eigendecomposition), which is what a batch's latents (N x latent_dim, thousands of dimensions)
allow; the price is that it learns no correlations between coordinates. R independent searches
(restarts) run in lockstep as one (R, ...) computation.
"""

from __future__ import annotations

import math

import torch


class SepCMA:
    """R independent separable CMA-ES runs of dimension n with `population` candidates each."""

    def __init__(self, mean: torch.Tensor, sigma: float, population: int, generator: torch.Generator) -> None:
        self.mean = mean.detach().clone()  # (R, n)
        r, n = mean.shape
        self.n, self.lam, self.generator = n, population, generator
        mu = population // 2
        w = torch.log(torch.tensor(mu + 0.5)) - torch.log(torch.arange(1, mu + 1, dtype=torch.float64))
        w = w / w.sum()
        self.weights = w.to(mean.dtype).to(mean.device)
        self.mu = mu
        mu_eff = float(1.0 / (w**2).sum())
        self.c_sigma = (mu_eff + 2) / (n + mu_eff + 5)
        self.d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + self.c_sigma
        self.c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
        c1 = 2 / ((n + 1.3) ** 2 + mu_eff)
        c_mu = min(1 - c1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
        # the separable variant's faster rates (Ros and Hansen), kept summing to at most 1
        scale = (n + 2) / 3
        self.c1, self.c_mu = c1 * scale, c_mu * scale
        if self.c1 + self.c_mu > 1:
            total = self.c1 + self.c_mu
            self.c1, self.c_mu = self.c1 / total, self.c_mu / total
        self.mu_eff = mu_eff
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self.sigma = torch.full((r,), sigma, dtype=mean.dtype, device=mean.device)
        self.diag = torch.ones_like(self.mean)  # the covariance's diagonal
        self.p_sigma = torch.zeros_like(self.mean)
        self.p_c = torch.zeros_like(self.mean)
        self.generation = 0
        self._z: torch.Tensor | None = None

    def ask(self) -> torch.Tensor:
        """Candidates (R, population, n) drawn around each run's mean."""
        r = self.mean.shape[0]
        z = torch.randn((r, self.lam, self.n), generator=self.generator, dtype=self.mean.dtype)
        self._z = z.to(self.mean.device)
        return self.mean[:, None] + self.sigma[:, None, None] * self.diag.sqrt()[:, None] * self._z

    def tell(self, losses: torch.Tensor) -> None:
        """Update each run from its candidates' losses (R, population), lower is better."""
        assert self._z is not None, "tell() follows ask()"
        order = torch.argsort(losses, dim=1)[:, : self.mu]  # (R, mu)
        z_sel = torch.gather(self._z, 1, order[..., None].expand(-1, -1, self.n))  # (R, mu, n)
        root = self.diag.sqrt()
        y_sel = root[:, None] * z_sel
        y_w = (self.weights[None, :, None] * y_sel).sum(1)
        z_w = (self.weights[None, :, None] * z_sel).sum(1)
        self.mean = self.mean + self.sigma[:, None] * y_w
        cs, cc = self.c_sigma, self.c_c
        self.p_sigma = (1 - cs) * self.p_sigma + math.sqrt(cs * (2 - cs) * self.mu_eff) * z_w
        ps_norm = self.p_sigma.norm(dim=1)
        self.generation += 1
        threshold = (1.4 + 2 / (self.n + 1)) * self.chi_n
        h_sigma = (ps_norm / math.sqrt(1 - (1 - cs) ** (2 * self.generation)) < threshold).to(self.mean.dtype)
        self.p_c = (1 - cc) * self.p_c + h_sigma[:, None] * math.sqrt(cc * (2 - cc) * self.mu_eff) * y_w
        rank_mu = (self.weights[None, :, None] * y_sel**2).sum(1)
        self.diag = (
            (1 - self.c1 - self.c_mu) * self.diag
            + self.c1 * (self.p_c**2 + ((1 - h_sigma) * cc * (2 - cc))[:, None] * self.diag)
            + self.c_mu * rank_mu
        )
        self.sigma = self.sigma * torch.exp((cs / self.d_sigma) * (ps_norm / self.chi_n - 1))
        self._z = None
