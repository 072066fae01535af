"""Privacy machinery: accounting (pure functions over a DP-SGD history) and the signed ledger."""

from fedsocial.shared.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ALPHAS,
    Event,
    History,
    PrivacyAccountant,
    PrivacyConfigError,
    calibrate_noise_multiplier,
    check_delta,
    compute_epsilon,
    compute_epsilon_dp_accounting,
    compute_epsilon_prv,
    compute_epsilon_rdp,
    compute_epsilons_dp_accounting,
    compute_epsilons_pld,
    compute_round_epsilon,
    would_exceed,
)
from fedsocial.shared.privacy.ledger import (
    ADJACENCY,
    GENESIS_HASH,
    UNIT,
    Ledger,
    LedgerError,
    Problem,
    TornTailWarning,
    read_ledger,
    record_refusal,
    recover_torn_tail,
    refusals_path,
    scan_ledger,
    verify_head,
    verify_ledger,
)

__all__ = [
    "ACCOUNTANTS", "ADJACENCY", "DEFAULT_ALPHAS", "GENESIS_HASH", "UNIT", "Event", "History", "Ledger",
    "LedgerError", "PrivacyAccountant", "PrivacyConfigError", "Problem", "TornTailWarning",
    "calibrate_noise_multiplier", "check_delta", "compute_epsilon", "compute_epsilon_dp_accounting",
    "compute_epsilons_dp_accounting",
    "compute_epsilons_pld",
    "compute_epsilon_prv", "compute_epsilon_rdp", "compute_round_epsilon", "read_ledger", "record_refusal",
    "recover_torn_tail", "refusals_path", "scan_ledger", "verify_head", "verify_ledger", "would_exceed",
]
