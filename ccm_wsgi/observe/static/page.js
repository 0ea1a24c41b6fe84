// The status page keeps itself current: every data-refresh seconds it fetches its live part and swaps it in,
// so the page never reloads (no flicker, the scroll position stays). A session that ended shows the sign-in.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) {
    return;
  }
  var every = (Number(live.getAttribute("data-refresh")) || 30) * 1000;
  function refresh() {
    fetch(live.getAttribute("data-src"), {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (response.status === 401) {
          window.location.reload();
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html) {
          live.innerHTML = html;
        }
      })
      .catch(function () {})
      .then(function () {
        window.setTimeout(refresh, every);
      });
  }
  window.setTimeout(refresh, every);
}());
