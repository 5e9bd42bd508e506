from marketplace.core.exceptions import ApplicationError, Conflict, NotFound


class InsufficientBalance(ApplicationError):
    """402: the submitter's balance cannot cover the job's escrow; nothing was created."""

    status = 402
    code = "insufficient_balance"


class WalletLinkRefused(ApplicationError):
    code = "wallet_link_refused"


class NoProof(NotFound):
    code = "no_proof"


class EpochOutOfOrder(Conflict):
    code = "epoch_out_of_order"


class EpochUnderfunded(Conflict):
    """409: the epoch's total exceeds what the payout contract can pay (its token balance plus everything
    already claimed); nothing was sent. Published once deposits cover it."""

    code = "epoch_underfunded"
