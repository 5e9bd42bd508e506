// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @title Idlegrid payout ledger
/// @notice Submitters deposit tokens; once per epoch the operator publishes the Merkle root of every
/// contributor's cumulative earnings; each contributor claims whenever they like and receives their
/// cumulative amount minus what they already claimed. One root settles an epoch whatever the number paid.
/// @dev Leaves use OpenZeppelin's standard format: keccak256(bytes.concat(keccak256(abi.encode(account,
/// cumulativeAmount)))). The double hash keeps a leaf from ever equalling an inner node (64-byte preimage).
/// Solvency: a root may commit at most what the ledger can ever pay, its token balance plus everything
/// already claimed (`RootExceedsFunds`), so a root the deposits do not cover is refused before anyone can
/// claim against it and drain tokens that back other people's earnings.
contract PayoutLedger is AccessControl, Pausable {
    using SafeERC20 for IERC20;

    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    bytes32 public constant PAUSER_ROLE = keccak256("PAUSER_ROLE");

    IERC20 public immutable token;

    // totalClaimed() + 1. Declared first so solc packs it beside Pausable's `bool _paused` in slot 1, offset 1
    // (solc's storageLayout output; tests/chain reads the slot). `whenNotPaused` has already read that slot in
    // `claim`, so adding to it costs ~3,300 gas (a warm SSTORE and the cast, measured) where a slot of its own
    // costs ~5,100 (cold SLOAD and SSTORE): the difference decides whether a claim at a million leaves stays
    // under 100,000 gas (bench/gas.py). It starts at 1, not 0, so the slot never goes from zero to non-zero
    // again and the first claim ever does not pay 20,000 more (why OpenZeppelin's ReentrancyGuard uses 1 and 2).
    uint248 private _claimedPlusOne = 1;

    /// @notice Root of the cumulative earnings tree of the latest published epoch (zero before the first).
    bytes32 public publishedRoot;
    /// @notice Latest published epoch (0 before the first); epochs are published one after the other.
    uint64 public publishedEpoch;
    // Packed with publishedEpoch so a steady-state publishRoot rewrites two storage slots, not three.
    uint192 private _publishedTotal;

    /// @notice Cumulative amount already paid to each account.
    mapping(address account => uint256) public claimed;

    event Deposited(address indexed from, uint256 amount);
    event RootPublished(uint64 indexed epoch, bytes32 root, uint256 total);
    event Claimed(address indexed account, uint256 amount, uint256 cumulative);

    error ZeroAddress();
    error ZeroAmount();
    error EmptyRoot();
    error EpochOutOfOrder(uint64 expected, uint64 given);
    error TotalDecreased(uint256 previous, uint256 given);
    error NoRootPublished();
    error InvalidProof();
    error NothingToClaim(address account, uint256 cumulative, uint256 alreadyClaimed);
    error RootExceedsFunds(uint256 total, uint256 funds);

    constructor(IERC20 token_, address admin, address operator) {
        if (address(token_) == address(0) || admin == address(0) || operator == address(0)) revert ZeroAddress();
        token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(PAUSER_ROLE, admin);
        _grantRole(OPERATOR_ROLE, operator);
    }

    /// @notice Total cumulative earnings committed by the latest root (never decreases).
    function publishedTotal() external view returns (uint256) {
        return _publishedTotal;
    }

    /// @notice Sum of every amount `claim` has paid out. A root may commit at most the token balance plus this.
    function totalClaimed() external view returns (uint256) {
        return _claimedPlusOne - 1;
    }

    /// @notice Moves `amount` of the token from the caller (who approved it) into the ledger; the
    /// marketplace credits the caller's balance once the Deposited event is deep enough.
    /// @dev The token must be a plain ERC-20 (no fee on transfer): the event reports `amount` as received.
    function deposit(uint256 amount) external whenNotPaused {
        if (amount == 0) revert ZeroAmount();
        emit Deposited(msg.sender, amount);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Publishes the root for `epoch`, which must follow the latest one, committing `total` (the sum of
    /// its leaves). Refused if `total` exceeds the token balance plus `totalClaimed()`: amounts are cumulative,
    /// so that is exactly what all claims against this root could ever take out. Allowed while paused so a
    /// corrected root can be in place before claims resume.
    /// @dev The contract cannot check that `total` is the sum of the leaves: the operator key stays trusted.
    /// balanceOf is a STATICCALL (a view) made before any write, so it cannot re-enter and change state.
    function publishRoot(uint64 epoch, bytes32 root, uint256 total) external onlyRole(OPERATOR_ROLE) {
        if (root == bytes32(0)) revert EmptyRoot();
        uint64 previousEpoch = publishedEpoch;
        if (epoch != previousEpoch + 1) revert EpochOutOfOrder(previousEpoch + 1, epoch);
        uint256 previousTotal = _publishedTotal;
        if (total < previousTotal) revert TotalDecreased(previousTotal, total);
        uint256 funds = token.balanceOf(address(this)) + (_claimedPlusOne - 1);
        if (total > funds) revert RootExceedsFunds(total, funds);
        publishedRoot = root;
        publishedEpoch = epoch;
        _publishedTotal = SafeCast.toUint192(total);
        emit RootPublished(epoch, root, total);
    }

    /// @notice Pays `account` its `cumulativeAmount` from the latest root minus what it already claimed, and
    /// adds that amount to totalClaimed. Anyone may send it (a relayer paying the gas); the tokens always go
    /// to `account`.
    function claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof) external whenNotPaused {
        bytes32 root = publishedRoot;
        if (root == bytes32(0)) revert NoRootPublished();
        if (_processProof(proof, _leaf(account, cumulativeAmount)) != root) revert InvalidProof();
        uint256 alreadyClaimed = claimed[account];
        if (cumulativeAmount <= alreadyClaimed) revert NothingToClaim(account, cumulativeAmount, alreadyClaimed);

        uint256 amount;
        unchecked {
            amount = cumulativeAmount - alreadyClaimed; // cannot wrap: cumulativeAmount > alreadyClaimed, just checked
        }
        claimed[account] = cumulativeAmount;
        _claimedPlusOne = SafeCast.toUint248(_claimedPlusOne + amount);
        emit Claimed(account, amount, cumulativeAmount);
        token.safeTransfer(account, amount);
    }

    /// @dev keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount)))) over the scratch space:
    /// the same bytes (the ABI decoder has already refused an address with dirty high bits), without the two
    /// memory allocations solc makes for abi.encode and bytes.concat; ~150 gas less a claim (measured).
    function _leaf(address account, uint256 cumulativeAmount) private pure returns (bytes32 leaf) {
        assembly ("memory-safe") {
            mstore(0x00, account)
            mstore(0x20, cumulativeAmount)
            mstore(0x00, keccak256(0x00, 0x40))
            leaf := keccak256(0x00, 0x20)
        }
    }

    /// @dev OpenZeppelin's MerkleProof.processProofCalldata (sorted pairs: the smaller word is hashed first),
    /// written as one branch-free assembly loop over the scratch space: ~120 gas a level instead of ~240 (with
    /// the optimizer), which at a million leaves (20 levels) keeps a claim under 100,000 gas. The word is stored
    /// at 0x00 or 0x20 by the comparison (Solady's MerkleProofLib does the same) and the loop tests at its end:
    /// ~45 gas a level less than choosing the smaller word by xor. tests/chain checks it against the Python
    /// tree, itself checked against OpenZeppelin's JavaScript library.
    function _processProof(bytes32[] calldata proof, bytes32 leaf) private pure returns (bytes32 computed) {
        computed = leaf;
        assembly ("memory-safe") {
            if proof.length {
                let end := add(proof.offset, shl(5, proof.length))
                for { let p := proof.offset } 1 {} {
                    let sibling := calldataload(p)
                    let at := shl(5, gt(computed, sibling))
                    mstore(at, computed)
                    mstore(xor(at, 0x20), sibling)
                    computed := keccak256(0x00, 0x40)
                    p := add(p, 0x20)
                    if iszero(lt(p, end)) { break }
                }
            }
        }
    }

    /// @notice Stops deposits and claims. Any pauser may stop; only the admin resumes.
    function pause() external onlyRole(PAUSER_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(DEFAULT_ADMIN_ROLE) {
        _unpause();
    }
}
