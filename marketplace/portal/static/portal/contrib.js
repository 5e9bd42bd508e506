// Idlegrid portal, contributor pages: a browser wallet (EIP-1193 window.ethereum), when there is one,
// signs the payout-address challenge and sends the claim. Without one these buttons stay hidden and the
// page's commands are the way; the forms work without JavaScript.
(function () {
  "use strict";

  function say(id, text) {
    var el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  function problem(error) {
    return (error && (error.message || error.toString())) || "the wallet refused";
  }

  function account() {
    return window.ethereum.request({ method: "eth_requestAccounts" }).then(function (accounts) {
      if (!accounts || !accounts.length) throw new Error("the wallet gave no account");
      return accounts[0];
    });
  }

  function signChallenge(button) {
    button.disabled = true;
    say("wallet-status", "Asking your wallet…");
    account().then(function (address) {
      return window.ethereum.request({ method: "personal_sign", params: [button.dataset.message, address] })
        .then(function (signature) {
          document.getElementById("id_address").value = address;
          document.getElementById("id_signature").value = signature;
          say("wallet-status", "Signed by " + address + ". Enter your password and link the address.");
          document.getElementById("id_password").focus();
        });
    }).catch(function (error) {
      say("wallet-status", "Not signed: " + problem(error));
    }).then(function () { button.disabled = false; });
  }

  function claim(button) {
    button.disabled = true;
    say("claim-status", "Asking your wallet…");
    account().then(function (from) {
      var tx = { from: from, to: button.dataset.to, data: button.dataset.data };
      if (button.dataset.chain) tx.chainId = button.dataset.chain;
      return window.ethereum.request({ method: "eth_sendTransaction", params: [tx] });
    }).then(function (hash) {
      say("claim-status", "Claim sent: transaction " + hash + ".");
    }).catch(function (error) {
      say("claim-status", "Not sent: " + problem(error));
    }).then(function () { button.disabled = false; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!window.ethereum || typeof window.ethereum.request !== "function") return;
    var sign = document.getElementById("wallet-sign");
    if (sign) { sign.hidden = false; sign.addEventListener("click", function () { signChallenge(sign); }); }
    var send = document.getElementById("wallet-claim");
    if (send) { send.hidden = false; send.addEventListener("click", function () { claim(send); }); }
  });
})();
