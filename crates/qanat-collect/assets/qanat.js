/* qanat.js: Qanat browser tracker. Include with
 *   <script src="https://COLLECTOR/qanat.js" data-app="web" async></script>
 * Sends a page view once the page is rendered and a click for every click inside an element
 * carrying data-spm, as beacons to COLLECTOR/t.gif. Optional attributes: data-app,
 * data-endpoint (beacon URL), data-uid (logged-in user id), data-cookie (visitor cookie name).
 * SPM code a.b.c.d: a.b from <meta name="spm-ab" content="a.b">, then the data-spm values of
 * the clicked element's ancestors (block) and of the element itself (position).
 * API: qanat.send(type, params), qanat.pageView(), qanat.sent (beacons handed to the browser).
 */
(function () {
  'use strict';
  var d = document, w = window, n = navigator;
  var script = d.currentScript;
  function attr(k) { return (script && script.getAttribute(k)) || ''; }
  var endpoint = attr('data-endpoint') ||
    (script && script.src ? new URL('t.gif', script.src).href : '/t.gif');
  var app = attr('data-app') || 'web';
  var cookieName = attr('data-cookie') || 'qvid';

  function readCookie(name) {
    var parts = d.cookie ? d.cookie.split(';') : [];
    for (var i = 0; i < parts.length; i++) {
      var kv = parts[i].trim().split('=');
      if (kv[0] === name) return kv.slice(1).join('=');
    }
    return '';
  }

  // The visitor id lives in a first-party cookie, so page views and clicks agree even before
  // the collector's own Set-Cookie comes back.
  function visitorId() {
    var v = readCookie(cookieName);
    if (/^[A-Za-z0-9_.:-]{1,128}$/.test(v)) return v;
    var b = new Uint8Array(16);
    (w.crypto || w.msCrypto).getRandomValues(b);
    v = '';
    for (var i = 0; i < b.length; i++) v += (b[i] < 16 ? '0' : '') + b[i].toString(16);
    d.cookie = cookieName + '=' + v + '; Max-Age=63072000; Path=/; SameSite=Lax';
    return v;
  }

  var qanat = w.qanat = w.qanat || {};
  qanat.sent = 0;

  qanat.send = function (type, params) {
    var p = {
      t: type, app: app, vid: visitorId(), uid: attr('data-uid'),
      url: location.href, sr: screen.width + 'x' + screen.height,
      lang: n.language || '', ts: String(Date.now())
    };
    for (var k in params) if (Object.prototype.hasOwnProperty.call(params, k)) p[k] = params[k];
    var q = [];
    for (var key in p) {
      if (p[key] !== undefined && p[key] !== null && p[key] !== '') {
        q.push(encodeURIComponent(key) + '=' + encodeURIComponent(p[key]));
      }
    }
    var url = endpoint + (endpoint.indexOf('?') < 0 ? '?' : '&') + q.join('&');
    var queued = false;
    // sendBeacon survives navigation away from the page (a click on a link).
    try { queued = !!(n.sendBeacon && n.sendBeacon(url)); } catch (e) { queued = false; }
    if (!queued) { var img = new Image(1, 1); img.src = url; }
    qanat.sent++;
  };

  function spmOf(el) {
    var parts = [];
    for (; el && el.getAttribute; el = el.parentElement) {
      var s = el.getAttribute('data-spm');
      if (s) parts.unshift(s);
    }
    var meta = d.querySelector('meta[name="spm-ab"]');
    var all = ((meta ? meta.content + '.' : '') + parts.join('.')).split('.');
    all = all.filter(function (x) { return x; });
    // a.b of the page, then the two innermost codes (block, position).
    return all.length > 4 ? all.slice(0, 2).concat(all.slice(-2)).join('.') : all.join('.');
  }

  qanat.pageView = function () {
    var m = /[?&]spm=([^&#]*)/.exec(location.search);
    qanat.send('page_view', {
      ref: d.referrer, title: d.title, spm: m ? decodeURIComponent(m[1]) : ''
    });
  };

  d.addEventListener('click', function (e) {
    var el = e.target && e.target.closest ? e.target.closest('[data-spm]') : null;
    if (!el) return;
    qanat.send('click', {
      spm: spmOf(el), title: d.title,
      p_text: (el.textContent || '').trim().slice(0, 64), p_href: el.href || ''
    });
  }, true);

  // D1: log the page view when the page is actually being rendered, not while prerendered.
  if (d.prerendering || d.visibilityState === 'prerender') {
    d.addEventListener('prerenderingchange', qanat.pageView, { once: true });
  } else {
    qanat.pageView();
  }
})();
