// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title Idlegrid test token
/// @notice A plain 18-decimal ERC-20 for local chains, tests and the demo. The deployer mints at will:
/// it has no value and must never back real payouts.
contract TestToken is ERC20, Ownable {
    constructor(address owner_) ERC20("Idlegrid Test Token", "IGT") Ownable(owner_) {}

    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
