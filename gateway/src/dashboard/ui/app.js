// The tollgate usage dashboard. Every data call goes through the admin
// routes with the admin key, which lives in this tab's session storage only.
// Ids and names from the gateway are written as text (textContent, attribute
// values), never as markup.
'use strict';

(function () {
  const STORAGE = 'tollgate-admin-key';
  const SVG = 'http://www.w3.org/2000/svg';
  const numbers = new Intl.NumberFormat('en-US');
  const state = { keys: [], plans: [], accounts: [], today: null, view: 'overview', timer: null };

  const $ = (id) => document.getElementById(id);

  /** A number with thousands separators; a dash for none. */
  function num(n) {
    return n === null || n === undefined ? '—' : numbers.format(n);
  }

  /** An element with attributes and children (strings become text nodes). */
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) e.setAttribute(k, String(v));
    }
    for (const c of children) {
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  function utc(iso) {
    return iso ? iso.replace('T', ' ').replace('Z', ' UTC') : '—';
  }

  /** A window's reset, to the minute (windows start on the hour). */
  function reset(iso) {
    return iso ? iso.slice(0, 10) + ' ' + iso.slice(11, 16) + ' UTC' : '—';
  }

  function status(message, error) {
    const s = $('status');
    s.textContent = message;
    s.className = error ? 'error' : '';
  }

  class Refused extends Error {}

  /** A call to an admin route with the admin key. */
  async function api(method, path, body) {
    const key = sessionStorage.getItem(STORAGE);
    if (!key) throw new Refused('not signed in');
    const init = { method, headers: { 'x-admin-key': key }, cache: 'no-store', credentials: 'omit' };
    if (body !== undefined) {
      init.headers['content-type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const res = await fetch(path, init);
    if (res.status === 403) throw new Refused('the admin key was refused');
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!res.ok) {
      const message = data && (data.message || (data.error && data.error.message));
      throw new Error(message || ('HTTP ' + res.status));
    }
    return data;
  }

  function failed(e) {
    if (e instanceof Refused) {
      signOut(e.message);
    } else {
      status('Error: ' + e.message, true);
    }
  }

  // ---- sign-in ----

  function signedIn() {
    return sessionStorage.getItem(STORAGE) !== null;
  }

  function showSignedIn(on) {
    $('signin').hidden = on;
    $('nav').hidden = !on;
    if (!on) for (const v of ['overview', 'keys', 'usage', 'traffic']) $('view-' + v).hidden = true;
  }

  function clearData() {
    for (const t of ['plans-table', 'accounts-table', 'keys-table', 'usage-table', 'traffic-table', 'top-table']) {
      $(t).tBodies[0].replaceChildren();
    }
    $('usage-chart').replaceChildren();
    $('traffic-chart').replaceChildren();
    $('new-key-box').hidden = true;
    $('new-key-value').textContent = '';
    state.keys = [];
  }

  function signOut(why) {
    sessionStorage.removeItem(STORAGE);
    stopPolling();
    clearData();
    showSignedIn(false);
    $('signin-error').textContent = why ? 'Signed out: ' + why + '.' : '';
    status('');
    $('admin-key').focus();
  }

  async function signIn(ev) {
    ev.preventDefault();
    const input = $('admin-key');
    sessionStorage.setItem(STORAGE, input.value);
    input.value = '';
    try {
      await api('GET', '/admin/plans');
    } catch (e) {
      signOut(e instanceof Refused ? 'the admin key was refused' : e.message);
      return;
    }
    $('signin-error').textContent = '';
    showSignedIn(true);
    show('overview');
  }

  // ---- views ----

  function show(view) {
    state.view = view;
    stopPolling();
    for (const v of ['overview', 'keys', 'usage', 'traffic']) $('view-' + v).hidden = v !== view;
    for (const b of document.querySelectorAll('#nav [data-view]')) {
      if (b.dataset.view === view) b.setAttribute('aria-current', 'page');
      else b.removeAttribute('aria-current');
    }
    status('');
    const load = { overview: loadOverview, keys: loadKeys, usage: loadUsageForm, traffic: startPolling }[view];
    return load().catch(failed);
  }

  function limitsText(t) {
    return t ? num(t.rate) + '/s, burst ' + num(t.burst) : '—';
  }

  function quotaText(q) {
    return q ? num(q.limit) + ' / ' + q.period : '—';
  }

  function tokensText(t) {
    if (!t) return '—';
    const parts = [];
    if (t.per_minute !== null) parts.push(num(t.per_minute) + '/min');
    if (t.per_day !== null) parts.push(num(t.per_day) + '/day');
    if (t.per_month !== null) parts.push(num(t.per_month) + '/month');
    return parts.join(', ') || '—';
  }

  async function loadOverview() {
    const [plans, accounts] = await Promise.all([api('GET', '/admin/plans'), api('GET', '/admin/accounts')]);
    state.plans = plans.plans;
    state.accounts = accounts.accounts;
    $('plans-table').tBodies[0].replaceChildren(...plans.plans.map((p) => el('tr', {},
      el('td', { class: 'c-name' }, p.name + (p.shadow ? ' (shadow)' : '')),
      el('td', {}, limitsText(p.throttle)),
      el('td', {}, quotaText(p.quota)),
      el('td', {}, p.quota ? utc(p.quota.next_reset) : '—'),
      el('td', {}, tokensText(p.tokens)),
      el('td', {}, p.concurrency === null ? '—' : num(p.concurrency)),
      el('td', { class: 'num' }, num(p.keys)))));
    $('accounts-table').tBodies[0].replaceChildren(...accounts.accounts.map((a) => el('tr', {},
      el('td', { class: 'c-name' }, a.name),
      el('td', {}, limitsText(a.throttle)),
      el('td', {}, quotaText(a.quota)),
      el('td', { class: 'num' }, a.today ? num(a.today.used) : '—'),
      el('td', { class: 'num' }, a.today ? num(a.today.remaining) : '—'),
      el('td', {}, a.quota ? utc(a.quota.next_reset) : '—'),
      el('td', {}, tokensText(a.tokens)),
      el('td', { class: 'num' }, num(a.keys)))));
    if (accounts.accounts.length === 0) {
      $('accounts-table').tBodies[0].append(el('tr', {}, el('td', { colspan: 8 }, 'No accounts.')));
    }
  }

  async function loadCatalog() {
    if (state.plans.length === 0) {
      const [plans, accounts] = await Promise.all([api('GET', '/admin/plans'), api('GET', '/admin/accounts')]);
      state.plans = plans.plans;
      state.accounts = accounts.accounts;
    }
  }

  function options(select, values, selected, none) {
    const opts = values.map((v) => el('option', { value: v, selected: v === selected }, v));
    if (none !== undefined) opts.unshift(el('option', { value: '' }, none));
    select.replaceChildren(...opts);
  }

  async function loadKeys() {
    await loadCatalog();
    const data = await api('GET', '/admin/keys');
    state.keys = data.keys;
    state.today = data.date;
    $('keys-date').textContent = 'Today: ' + data.date + ' (UTC)';
    options($('new-plan'), state.plans.map((p) => p.name));
    options($('new-account'), state.accounts.map((a) => a.name), null, '(none)');
    renderKeys();
  }

  function renderKeys() {
    const needle = $('key-filter').value.trim().toLowerCase();
    const rows = state.keys
      .filter((k) => !needle || k.id.toLowerCase().includes(needle) || k.plan.toLowerCase().includes(needle)
        || (k.account || '').toLowerCase().includes(needle))
      .map(keyRow);
    if (rows.length === 0) rows.push(el('tr', {}, el('td', { colspan: 10 }, 'No keys match.')));
    $('keys-table').tBodies[0].replaceChildren(...rows);
  }

  function keyRow(k) {
    const q = k.quota;
    const toggle = el('button', { type: 'button', class: 'toggle' }, k.enabled ? 'Disable' : 'Enable');
    toggle.setAttribute('aria-label', (k.enabled ? 'Disable ' : 'Enable ') + k.id);
    toggle.addEventListener('click', () => act(patchKey(k.id, { enabled: !k.enabled }),
      'Key ' + k.id + (k.enabled ? ' disabled.' : ' enabled.')));

    const plan = el('select', { class: 'plan', 'aria-label': 'Plan for ' + k.id });
    options(plan, state.plans.map((p) => p.name), k.plan);
    const move = el('button', { type: 'button', class: 'move' }, 'Move');
    move.setAttribute('aria-label', 'Move ' + k.id + ' to the chosen plan');
    move.addEventListener('click', () => act(patchKey(k.id, { plan: plan.value }),
      'Key ' + k.id + ' moved to plan ' + plan.value + '.'));

    const remaining = el('input', { type: 'number', min: 0, step: 1, class: 'remaining', placeholder: 'count', 'aria-label': 'Remaining quota for ' + k.id });
    const set = el('button', { type: 'button', class: 'set-remaining', disabled: !q }, 'Set');
    set.setAttribute('aria-label', 'Set the remaining quota of ' + k.id);
    set.addEventListener('click', () => {
      const n = Number(remaining.value);
      if (remaining.value === '' || !Number.isSafeInteger(n) || n < 0) {
        status('Remaining quota must be a whole number of at least 0.', true);
        remaining.focus();
        return;
      }
      act(api('PATCH', '/admin/keys/' + encodeURIComponent(k.id) + '/usage', { remaining: n }),
        'Key ' + k.id + ': remaining quota set to ' + num(n) + '.');
    });

    const chart = el('button', { type: 'button', class: 'chart-key' }, 'Chart');
    chart.setAttribute('aria-label', 'Chart the usage of ' + k.id);
    chart.addEventListener('click', () => {
      show('usage').then(() => {
        $('usage-subject').value = 'key:' + k.id;
        return drawUsage();
      }).catch(failed);
    });

    return el('tr', { 'data-key': k.id },
      el('td', { class: 'c-id' }, k.id),
      el('td', { class: 'c-plan' }, k.plan),
      el('td', { class: 'c-account' }, k.account || '—'),
      el('td', { class: 'c-enabled' + (k.enabled ? '' : ' off') }, k.enabled ? 'yes' : 'no'),
      el('td', { class: 'num c-used' }, q ? num(q.used) : '—'),
      el('td', { class: 'num c-remaining' }, q ? num(q.remaining) : '—'),
      el('td', { class: 'num c-quota' }, q ? num(q.limit) + ' / ' + q.period : '—'),
      el('td', { class: 'num c-tokens' }, tokensLeft(k.tokens)),
      el('td', { class: 'c-reset' }, q ? reset(q.next_reset) : '—'),
      el('td', { class: 'actions' }, toggle, ' ', plan, move, ' ', remaining, set, ' ', chart));
  }

  const BUDGET = { 'tokens-minute': '/min', 'tokens-day': '/day', 'tokens-month': '/month' };

  /** What remains of each token budget: "39,991 of 40,000/min". */
  function tokensLeft(budgets) {
    if (!budgets || budgets.length === 0) return '—';
    return budgets.map((b) => num(b.remaining) + ' of ' + num(b.limit) + (BUDGET[b.name] || ' ' + b.name)).join('; ');
  }

  function patchKey(id, body) {
    return api('PATCH', '/admin/keys/' + encodeURIComponent(id), body);
  }

  /** Runs an admin change, confirms it, and reloads the keys. */
  async function act(call, confirmation) {
    try {
      await call;
      await loadKeys();
      status(confirmation);
    } catch (e) {
      failed(e);
    }
  }

  async function addKey(ev) {
    ev.preventDefault();
    const body = { id: $('new-id').value.trim(), plan: $('new-plan').value };
    if ($('new-account').value) body.account = $('new-account').value;
    if ($('new-value').value) body.value = $('new-value').value;
    try {
      const key = await api('POST', '/admin/keys', body);
      $('new-id').value = '';
      $('new-value').value = '';
      await loadKeys();
      if (key.value) {
        $('new-key-value').textContent = key.value;
        $('new-key-box').hidden = false;
        $('new-key-done').focus();
      }
      status('Key ' + key.id + ' added to plan ' + key.plan + '.');
    } catch (e) {
      failed(e);
    }
  }

  // ---- usage per day ----

  function isoDay(d) {
    return d.toISOString().slice(0, 10);
  }

  async function loadUsageForm() {
    await loadCatalog();
    if (state.keys.length === 0 || !state.today) {
      const data = await api('GET', '/admin/keys');
      state.keys = data.keys;
      state.today = data.date;
    }
    const select = $('usage-subject');
    const before = select.value;
    const opts = [];
    for (const k of state.keys) opts.push(el('option', { value: 'key:' + k.id }, 'key ' + k.id));
    for (const a of state.accounts) {
      if (a.quota) opts.push(el('option', { value: 'account:' + a.name }, 'account ' + a.name));
    }
    select.replaceChildren(...opts);
    if (before) select.value = before;
    if (!$('usage-end').value) {
      // The gateway's UTC day, which need not be the browser's.
      const today = new Date(state.today + 'T00:00:00Z');
      $('usage-end').value = isoDay(today);
      $('usage-start').value = isoDay(new Date(today.getTime() - 6 * 86400000));
    }
  }

  async function drawUsage() {
    const subject = $('usage-subject').value;
    const start = $('usage-start').value;
    const end = $('usage-end').value;
    if (!subject) {
      status('No key or account with a quota to show.', true);
      return;
    }
    const kind = subject.slice(0, subject.indexOf(':'));
    const name = subject.slice(subject.indexOf(':') + 1);
    const range = '&start=' + encodeURIComponent(start) + '&end=' + encodeURIComponent(end);
    let days;
    let quota;
    if (kind === 'key') {
      const key = state.keys.find((k) => k.id === name);
      if (!key) throw new Error('unknown key');
      quota = key.quota;
      const report = await api('GET', '/admin/usage?plan=' + encodeURIComponent(key.plan) + range
        + '&key=' + encodeURIComponent(name));
      days = report.items[name] || [];
      days = { start: report.start, list: days };
    } else {
      const account = state.accounts.find((a) => a.name === name);
      quota = account && account.quota;
      const report = await api('GET', '/admin/accounts/' + encodeURIComponent(name) + '/usage?' + range.slice(1));
      days = { start: report.start, list: report.items[name] || [] };
    }
    const first = new Date(days.start + 'T00:00:00Z').getTime();
    const rows = days.list.map(([used, remaining], i) => ({ day: isoDay(new Date(first + i * 86400000)), used, remaining }));
    $('usage-caption').textContent = kind + ' ' + name + ', ' + start + ' to ' + end + ' (UTC)'
      + (quota ? '; quota ' + num(quota.limit) + ' / ' + quota.period + ', next reset ' + utc(quota.next_reset) : '');
    $('usage-table').tBodies[0].replaceChildren(...rows.map((r) => el('tr', { 'data-day': r.day },
      el('td', {}, r.day), el('td', { class: 'num c-used' }, num(r.used)), el('td', { class: 'num c-remaining' }, num(r.remaining)))));
    $('usage-chart').replaceChildren(barChart(rows, quota ? quota.limit : null));
    status('');
  }

  function barChart(rows, limit) {
    const W = 900, H = 300, left = 56, bottom = 40, top = 34;
    const most = Math.max(1, ...rows.map((r) => r.used));
    // A quota far above the bars (a month's, say) would flatten them: it is
    // then drawn at the top, marked as off the scale.
    const onScale = limit && limit <= most * 4;
    const max = onScale ? Math.max(most, limit) : Math.ceil(most * 1.15);
    const y = (v) => top + (H - top - bottom) * (1 - v / max);
    const root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'Requests per UTC day' });
    root.append(svg('line', { x1: left, y1: y(0), x2: W - 10, y2: y(0), stroke: '#888' }));
    root.append(svg('text', { x: left - 6, y: y(max) + 4, class: 'y-label' }, num(max)));
    root.append(svg('text', { x: left - 6, y: y(0) + 4, class: 'y-label' }, '0'));
    const slot = (W - left - 10) / Math.max(1, rows.length);
    const bw = Math.max(2, slot * 0.7);
    rows.forEach((r, i) => {
      const x = left + i * slot + (slot - bw) / 2;
      const bar = svg('rect', { x, y: y(r.used), width: bw, height: Math.max(0, y(0) - y(r.used)), class: 'bar', 'data-day': r.day, 'data-used': r.used });
      bar.append(svg('title', {}, r.day + ': ' + num(r.used) + ' used, ' + num(r.remaining) + ' remaining'));
      root.append(bar);
      root.append(svg('text', { x: x + bw / 2, y: y(r.used) - 4, class: 'bar-label' }, num(r.used)));
      root.append(svg('text', { x: x + bw / 2, y: H - bottom + 16, class: 'axis-label' }, r.day.slice(5)));
    });
    if (limit) {
      const at = onScale ? y(limit) : 10;
      root.append(svg('line', { x1: left, y1: at, x2: W - 10, y2: at, class: 'quota-line' }));
      root.append(svg('text', { x: left + 4, y: at + (onScale ? -4 : 14), class: 'quota-label' },
        'quota ' + num(limit) + (onScale ? '' : ' (above the scale)')));
    }
    return root;
  }

  // ---- live traffic ----

  const OUTCOME = {
    allowed: 'allowed',
    throttled: 'throttled',
    quota: 'quota',
    tokens: 'tokens',
    concurrency: 'concurrency',
    store_failure: 'store failure',
    key: 'key refused (missing, unknown, disabled)',
  };

  function outcomeLabel(o) {
    return OUTCOME[o] || o;
  }

  function startPolling() {
    stopPolling();
    state.timer = setInterval(() => { pollTraffic().catch(failed); }, 2000);
    return pollTraffic();
  }

  function stopPolling() {
    if (state.timer !== null) clearInterval(state.timer);
    state.timer = null;
  }

  async function pollTraffic() {
    const data = await api('GET', '/admin/traffic?seconds=' + encodeURIComponent($('traffic-window').value));
    if (state.view !== 'traffic') return;
    $('traffic-end').textContent = 'up to ' + utc(data.end);
    $('traffic-table').tBodies[0].replaceChildren(...data.outcomes.map((o) => {
      const series = data.series[o];
      const recent = series.slice(-10).reduce((a, b) => a + b, 0) / Math.min(10, series.length);
      return el('tr', { 'data-outcome': o },
        el('td', {}, outcomeLabel(o)),
        el('td', { class: 'num c-total' }, num(data.totals[o])),
        el('td', { class: 'num c-rate' }, num(Math.round(recent * 10) / 10)));
    }));
    const top = data.top_rejected.map((t) => el('tr', { 'data-key': t.id },
      el('td', { class: 'c-id' }, t.id), el('td', { class: 'num c-rejected' }, num(t.rejected))));
    if (top.length === 0) top.push(el('tr', {}, el('td', { colspan: 2 }, 'No refusals in the window.')));
    $('top-table').tBodies[0].replaceChildren(...top);
    $('traffic-chart').replaceChildren(lineChart(data));
  }

  function lineChart(data) {
    const W = 900, H = 260, left = 56, bottom = 30, top = 20, right = 130;
    const n = data.seconds;
    let max = 1;
    for (const o of data.outcomes) for (const v of data.series[o]) max = Math.max(max, v);
    const x = (i) => left + (W - left - right) * (n === 1 ? 0 : i / (n - 1));
    const y = (v) => top + (H - top - bottom) * (1 - v / max);
    const root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'Decisions per second by outcome' });
    root.append(svg('line', { x1: left, y1: y(0), x2: W - right, y2: y(0), stroke: '#888' }));
    root.append(svg('text', { x: left - 6, y: y(max) + 4, class: 'y-label' }, num(max) + '/s'));
    root.append(svg('text', { x: left - 6, y: y(0) + 4, class: 'y-label' }, '0'));
    root.append(svg('text', { x: left, y: H - 8, class: 'axis-label' }, '−' + num(n) + ' s'));
    root.append(svg('text', { x: W - right, y: H - 8, class: 'axis-label' }, 'now'));
    data.outcomes.forEach((o, k) => {
      const points = data.series[o].map((v, i) => x(i).toFixed(1) + ',' + y(v).toFixed(1)).join(' ');
      root.append(svg('polyline', { points, class: 'series o-' + o }));
      root.append(svg('rect', { x: W - right + 10, y: top + k * 18, width: 10, height: 10, class: 'o-' + o }));
      root.append(svg('text', { x: W - right + 26, y: top + k * 18 + 9, class: 'legend' }, o === 'key' ? 'key refused' : outcomeLabel(o)));
    });
    return root;
  }

  // ---- clock ----

  function tick() {
    $('clock').textContent = utc(new Date().toISOString().slice(0, 19) + 'Z');
  }

  // ---- wiring ----

  document.addEventListener('DOMContentLoaded', () => {
    $('signin-form').addEventListener('submit', signIn);
    $('signout').addEventListener('click', () => signOut(''));
    for (const b of document.querySelectorAll('#nav [data-view]')) {
      b.addEventListener('click', () => { show(b.dataset.view); });
    }
    $('key-filter').addEventListener('input', renderKeys);
    $('add-key-form').addEventListener('submit', addKey);
    $('new-key-done').addEventListener('click', () => {
      $('new-key-value').textContent = '';
      $('new-key-box').hidden = true;
    });
    $('usage-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      drawUsage().catch(failed);
    });
    $('traffic-window').addEventListener('change', () => { pollTraffic().catch(failed); });
    tick();
    setInterval(tick, 1000);
    if (signedIn()) {
      showSignedIn(true);
      show('overview');
    } else {
      showSignedIn(false);
      $('admin-key').focus();
    }
  });
}());
