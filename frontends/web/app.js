// atelier's web page: plain JS on the native HTTP API (/v1/…), no build step.
'use strict';

const $ = (selector) => document.querySelector(selector);
const form = $('#form');
const field = (name) => form.elements.namedItem(name);

// Chromium opens six connections per host over HTTP/1.1 and every event stream holds one:
// follow at most four jobs at once, so submits and cancels always find a free connection.
const MAX_STREAMS = 4;
const LIVE_DEBOUNCE_MS = 150;
const TERMINAL = new Set(['done', 'failed', 'cancelled']);

// A live session is this tab's: sessionStorage keeps it across a reload of the tab, not beyond.
// getRandomValues, not randomUUID: the page may be served over plain HTTP beyond localhost.
const session = sessionStorage.getItem('atelier.session') || (() => {
  const id = 'web-' + [...crypto.getRandomValues(new Uint8Array(12))]
    .map((b) => b.toString(16).padStart(2, '0')).join('');
  sessionStorage.setItem('atelier.session', id);
  return id;
})();

const jobs = new Map();   // job id -> the API's view of it, plus what this page made of it
let models = new Map();
let stageId = null;       // the job the big image and progress bar show

const terminal = (job) => TERMINAL.has(job.state);
const superseded = (job) => job.state === 'cancelled' && /superseded/.test(job.reason || '');
const isLive = (job) => job.spec.priority === 'live';
// How an output is shown: MP4 in a <video>, a sound in an <audio>; images, GIF and WebP in an <img>.
const playerOf = (job) => job.spec.output_format === 'mp4' ? 'video'
  : ['wav', 'flac'].includes(job.spec.output_format) ? 'audio' : 'img';
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- the API, with the token ----------------------------------------------- //

let token = localStorage.getItem('atelier.token') || '';
let asking = null;  // one token prompt answers every request that got a 401 meanwhile

// The token only ever travels in a header: EventSource cannot send one, so streams are read with
// fetch too, and images are fetched as blobs rather than put in <img src> as URLs.
async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers);
    if (token) headers.set('Authorization', `Bearer ${token}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    await askToken((await problem(response)).message);
  }
}

function askToken(message) {
  asking ||= new Promise((resolve, reject) => {
    const dialog = $('#auth');
    $('#auth-message').textContent = message || 'This server needs a token.';
    $('#token').value = token;
    dialog.addEventListener('close', () => {
      asking = null;
      if (dialog.returnValue !== 'save') return reject(new Error('this server needs a token'));
      token = $('#token').value.trim();
      localStorage.setItem('atelier.token', token);
      resolve();
    }, { once: true });
    dialog.returnValue = '';
    dialog.showModal();
  });
  return asking;
}

// The API's error body as an Error that names the field, and when to come back after a 429.
async function problem(response) {
  const body = await response.json().catch(() => ({}));
  const error = body.error || {};
  return Object.assign(new Error(error.message || `${response.status} ${response.statusText}`), {
    status: response.status, field: error.field,
    retryAfter: Number(response.headers.get('Retry-After')) || error.retry_after_s || 1,
  });
}

async function json(path, options) {
  const response = await api(path, options);
  if (!response.ok) throw await problem(response);
  return response.json();
}

// Artifacts are fetched by name from this page's own server: the URL in a job names the server's
// public address, which need not be this origin, and the token must not go anywhere else.
const images = new Map();  // artifact URL -> promise of an object URL, so each is fetched once
function image(url) {
  if (!images.has(url)) {
    const name = url.split('/').pop();
    images.set(url, api(`v1/artifacts/${encodeURIComponent(name)}`).then(async (response) => {
      if (!response.ok) throw await problem(response);
      return URL.createObjectURL(await response.blob());
    }).catch((error) => { images.delete(url); throw error; }));
  }
  return images.get(url);
}

// -- jobs and their event streams ------------------------------------------ //

function upsert(view) {
  let job = jobs.get(view.spec.id);
  if (!job) {
    job = { id: view.spec.id, step: 0, total: view.spec.steps || 0, preview: null, final: null,
            abort: new AbortController() };
    jobs.set(job.id, job);
  }
  // An ended job stays ended: a reply sent before its end (a cancel's answer, a slow list) can
  // arrive after the stream has told its end, and must not bring it back to life.
  if (terminal(job) && !TERMINAL.has(view.state)) return job;
  Object.assign(job, { spec: view.spec, state: view.state, reason: view.reason, position: view.position,
                       eta_s: view.eta_s, submitted_at: view.submitted_at, urls: view.urls || [] });
  return job;
}

let streams = 0;
const waiting = [];
async function follow(job) {
  if (job.following) return;
  job.following = true;
  if (streams < MAX_STREAMS) streams++;
  else await new Promise((resolve) => waiting.push(resolve));  // a finished stream hands its place over
  try {
    // A dropped connection is not the job's end: read again, from its latest state, until it ends.
    for (let attempt = 0; !terminal(job) && !job.abort.signal.aborted; attempt++) {
      try {
        await readEvents(job);
      } catch (error) {
        if (job.abort.signal.aborted || (error.status >= 400 && error.status < 500)) return;
      }
      if (!terminal(job)) await sleep(Math.min(5000, 250 * 2 ** attempt));
    }
  } finally {
    job.following = false;
    const next = waiting.shift();
    if (next) next(); else streams--;
  }
}

// Server-Sent Events by hand: `event:` names the next `data:`, a blank line ends the event.
async function readEvents(job) {
  const response = await api(`v1/jobs/${job.id}/events`, { signal: job.abort.signal });
  if (!response.ok) throw await problem(response);
  await readStream(response, (name, data) => onEvent(job, name, data));
}

// Hands each event of a text/event-stream response to `onEvent(name, data)` until the stream ends.
async function readStream(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '', name = 'message', data = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, '');
      buffer = buffer.slice(end + 1);
      if (line === '') {
        if (data) onEvent(name, JSON.parse(data));
        name = 'message';
        data = '';
      } else if (line.startsWith('event:')) {
        name = line.slice(6).trim();
      } else if (line.startsWith('data:')) {
        data += (data ? '\n' : '') + line.slice(5).replace(/^ /, '');
      }  // anything else (": keep-alive") is a comment
    }
  }
}

function onEvent(job, name, data) {
  if (name === 'state') {
    Object.assign(job, { state: data.state, reason: data.reason, position: data.position, eta_s: data.eta_s });
  } else if (name === 'progress') {
    Object.assign(job, { step: data.step, total: data.total, eta_s: data.eta_s });
  } else if (name === 'preview') {
    job.preview = data.image;
  } else if (name === 'result') {
    upsert(data);
    if (job.state === 'done') addToGallery(job);
  }
  show(job);
}

function show(job) {
  if (superseded(job)) return;  // a newer prompt of the same live session took its place: nothing to say
  if (!isLive(job)) row(job);
  if (job.id === stageId) renderStage();
}

// -- what the user sees ------------------------------------------------------ //

function seconds(s) {
  if (s == null) return '';
  s = Math.max(0, Math.round(s));
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}

function describe(job) {
  const eta = job.eta_s != null && !terminal(job) ? ` · ETA ${seconds(job.eta_s)}` : '';
  switch (job.state) {
    case 'queued': return (job.position != null ? `#${job.position + 1} in queue` : 'Queued') + eta;
    case 'assigned': return 'Starting' + eta;
    case 'loading': return 'Loading the model' + eta;
    case 'running': return (job.total ? `Step ${job.step}/${job.total}` : 'Running') + eta;
    case 'done': return 'Done';
    case 'failed': return `Failed: ${job.reason || 'no reason given'}`;
    case 'cancelled': return job.reason && job.reason !== 'cancelled' ? `Cancelled: ${job.reason}` : 'Cancelled';
    default: return job.state;
  }
}

const fraction = (job) => job.state === 'done' ? 1 : job.state === 'running' && job.total ? job.step / job.total : 0;

function stage(job) {
  stageId = job.id;
  renderStage();
}

let shown = null;  // the src the big image shows, and so the job whose image it is
function renderStage() {
  const job = jobs.get(stageId);
  if (!job) return;
  if (job.state === 'done' && job.urls.length && !job.final) {
    image(job.urls[0]).then((src) => { job.final = src; if (job.id === stageId) renderStage(); }, () => {});
  }
  const img = $('#preview');
  const player = playerOf(job);
  // A video or a sound plays in its own element; the image keeps the last preview (a sound's loudness).
  const src = (player === 'img' && job.final) || job.preview;
  for (const [kind, element] of [['video', $('#video')], ['audio', $('#audio')]]) {
    const mine = kind === player && job.final;
    if (mine && element.dataset.job !== job.id) Object.assign(element, { src: job.final }).dataset.job = job.id;
    element.hidden = !mine;
  }
  if (player === 'video' && job.final) img.hidden = true;
  else if (src && src !== shown) {
    shown = src;
    img.src = src;
    img.dataset.job = job.id;
    img.dataset.prompt = job.spec.prompt;
    img.alt = job.spec.prompt;
    img.hidden = false;
    $('#empty').hidden = true;
  }
  // Until the new job's first preview, the last image stays, dimmed, so the page does not flash.
  img.classList.toggle('stale', img.dataset.job !== job.id);
  img.classList.toggle('final', img.dataset.job === job.id && !!job.final);
  $('#frame').style.aspectRatio = `${job.spec.width || 1} / ${job.spec.height || 1}`;
  $('#caption').textContent = job.spec.prompt;
  $('#status').textContent = describe(job);
  $('#status').dataset.state = job.state;
  $('#stage').dataset.state = job.state;
  $('#stage').dataset.job = job.id;
  $('#bar').style.width = `${fraction(job) * 100}%`;
  $('#cancel').hidden = terminal(job);
}

function row(job) {
  if (!job.el) {
    const li = job.el = document.createElement('li');
    li.dataset.job = job.id;
    li.dataset.t = job.submitted_at;
    li.innerHTML = '<div class="text"><span class="prompt"></span><span class="meta"></span>' +
                   '<span class="state"></span></div><button class="ghost" type="button">Cancel</button>' +
                   '<div class="bar"><span></span></div>';
    li.querySelector('.prompt').textContent = job.spec.prompt;
    const { model, width, height, steps, count, seed, controlnet, inputs = [] } = job.spec;
    li.querySelector('.meta').textContent = [model, width && `${width}×${height}`, steps && `${steps} steps`,
      count > 1 && `×${count}`, seed != null && `seed ${seed}`, controlnet && `ControlNet ${controlnet}`,
      inputs.includes('ip_adapter_image') && 'reference image'].filter(Boolean).join(' · ');
    li.querySelector('button').addEventListener('click', (event) => { event.stopPropagation(); cancel(job); });
    li.addEventListener('click', () => stage(job));
    insertByTime($('#jobs'), li);
  }
  job.el.dataset.state = job.state;
  job.el.querySelector('.state').textContent = describe(job);
  job.el.querySelector('.bar span').style.width = `${fraction(job) * 100}%`;
  job.el.querySelector('button').hidden = terminal(job);
}

// Newest first, by when each job was submitted (a late result does not jump the queue).
function insertByTime(list, element) {
  const t = Number(element.dataset.t);
  const later = [...list.children].find((other) => Number(other.dataset.t) < t);
  list.insertBefore(element, later || null);
}

const lazy = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    lazy.unobserve(entry.target);
    image(entry.target.dataset.src).then((src) => { entry.target.src = src; },
                                         () => entry.target.classList.add('broken'));
  }
}, { rootMargin: '400px' });

function addToGallery(job) {
  const gallery = $('#gallery');
  if (gallery.querySelector(`[data-job="${job.id}"]`)) return;
  // A live session is one picture that changes as its prompt does: keep only its newest image.
  if (isLive(job) && job.spec.session) {
    for (const tile of gallery.querySelectorAll(`[data-session="${CSS.escape(job.spec.session)}"]`)) {
      if (Number(tile.dataset.t) > job.submitted_at) return;
      tile.remove();
    }
  }
  job.urls.forEach((url, index) => {
    const tile = document.createElement('button');
    tile.type = 'button';
    tile.className = 'tile';
    Object.assign(tile.dataset, { job: job.id, t: job.submitted_at, prompt: job.spec.prompt });
    if (isLive(job) && job.spec.session) tile.dataset.session = job.spec.session;
    tile.title = job.spec.prompt;
    // A video plays in its tile, muted; a sound shows its name (its player is in the viewer).
    const player = playerOf(job);
    const media = document.createElement(player === 'video' ? 'video' : player === 'audio' ? 'span' : 'img');
    if (player === 'audio') {
      media.className = 'sound';
      media.textContent = `♪ ${job.spec.prompt}`;
    } else {
      Object.assign(media, player === 'video' ? { muted: true, loop: true, autoplay: true, playsInline: true }
                                              : { alt: job.spec.prompt });
      media.dataset.src = url;
      lazy.observe(media);
    }
    tile.append(media);
    tile.addEventListener('click', () => openViewer(job, index));
    insertByTime(gallery, tile);
  });
}

async function openViewer(job, index) {
  const src = await image(job.urls[index]).catch(() => null);
  if (!src) return;
  const player = playerOf(job);
  for (const [kind, element] of [['img', $('#viewer-img')], ['video', $('#viewer-video')],
                                 ['audio', $('#viewer-audio')]]) {
    element.hidden = kind !== player;
    if (kind === player) element.src = src; else element.removeAttribute('src');
  }
  $('#viewer-img').alt = job.spec.prompt;
  $('#viewer-caption').textContent = `${job.spec.prompt} · seed ${job.spec.seed + index}`;
  $('#viewer-download').href = src;
  $('#viewer-download').download = job.urls[index].split('/').pop();
  $('#viewer').showModal();
}

function showError(error) {
  $('#form-error').textContent = error ? error.message : '';
  for (const input of form.querySelectorAll('[aria-invalid]')) input.removeAttribute('aria-invalid');
  const named = error && error.field && field(error.field);
  if (named) named.setAttribute('aria-invalid', 'true');
}

// -- the form ---------------------------------------------------------------- //

// What the model does from a prompt alone, or from an image: the same preference as the CLI's and
// Discord's (an image, else a video, else a sound; an edit, else an upscale, else a video).
function defaultKind(model, fromImage) {
  const preferred = fromImage ? ['img2img', 'upscale', 'img2vid'] : ['txt2img', 'txt2vid', 'txt2audio'];
  return preferred.find((kind) => model.kinds.includes(kind)) || null;
}

const readAsDataURL = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result);
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});

// "name:0.8, other" -> {name: 0.8, other: 1}
function parseLoras(text) {
  const loras = {};
  for (const part of text.split(',').map((p) => p.trim()).filter(Boolean)) {
    const [name, scale] = part.split(':').map((p) => p.trim());
    loras[name] = scale === undefined || scale === '' ? 1 : Number(scale);
  }
  return loras;
}

async function specFromForm() {
  const model = models.get(field('model').value);
  const file = field('image').files[0];
  const spec = { model: field('model').value, prompt: field('prompt').value };
  if (model) spec.kind = defaultKind(model, !!file) || undefined;
  // A job from an image keeps the image's size: width and height are left to it.
  const names = ['steps', 'count', 'seed', 'frames', 'fps', ...(file ? [] : ['width', 'height'])];
  for (const name of names) {
    if (!field(name).closest('[hidden]') && field(name).value !== '') spec[name] = Number.parseInt(field(name).value, 10);
  }
  for (const name of ['guidance', 'strength', 'duration_s']) {
    if (!field(name).closest('[hidden]') && field(name).value !== '') spec[name] = Number.parseFloat(field(name).value);
  }
  if (field('negative_prompt').value.trim()) spec.negative_prompt = field('negative_prompt').value;
  if (!field('loras').hidden && field('loras').value.trim()) spec.loras = parseLoras(field('loras').value);
  if (file) spec.image = await readAsDataURL(file);
  Object.assign(spec, await conditioningFromForm());
  return spec;
}

// The ControlNet with its control image, and the IP-Adapter's reference image, each with its scale:
// only what the chosen model shows, and a scale only beside its image (the API refuses one alone).
async function conditioningFromForm() {
  const spec = {};
  const scale = (name) => field(name).value === '' ? {} : { [name]: Number.parseFloat(field(name).value) };
  const control = field('control_image').files[0];
  if (!field('controlnet').closest('[hidden]') && field('controlnet').value && control) {
    Object.assign(spec, { controlnet: field('controlnet').value, control_image: await readAsDataURL(control) },
                  scale('controlnet_scale'));
  }
  const reference = field('ip_adapter_image').files[0];
  if (!field('ip_adapter_image').closest('[hidden]') && reference) {
    Object.assign(spec, { ip_adapter_image: await readAsDataURL(reference) }, scale('ip_adapter_scale'));
  }
  return spec;
}

// A server from before ControlNets were listed says nothing of them: none, then.
const controlnetsOf = (model) => model.controlnets || [];

// Shows the fields the chosen model uses: an image to start from, a video's frames, a sound's length, LoRAs,
// a ControlNet and its control image, an IP-Adapter's reference image.
function fitForm() {
  const model = models.get(field('model').value);
  if (!model) return;
  const takesImage = !!defaultKind(model, true);
  const needsImage = !defaultKind(model, false);
  const file = field('image').files[0];
  const visible = {
    'image-input': takesImage, strength: model.kinds.includes('img2img') && !!file,
    video: model.media === 'video', audio: model.media === 'audio', sized: model.media !== 'audio' && !file,
    loras: model.loras.length > 0,
    controlnets: controlnetsOf(model).length > 0, control: !!field('controlnet').value,
    'ip-adapter': !!model.ip_adapter, reference: !!field('ip_adapter_image').files[0],
  };
  for (const element of document.querySelectorAll('[data-for]')) element.hidden = !visible[element.dataset.for];
  field('image').required = needsImage;
  // A chosen ControlNet reads a control image: without one the browser asks for it, as for a needed image.
  field('control_image').required = visible.controlnets && visible.control;
  $('#image-hint').textContent = needsImage ? `(${defaultKind(model, true)}: needed)` : '(optional: start from it)';
  $('#loras-hint').textContent = model.loras.length ? `(${model.loras.join(', ')})` : '';
}

async function submit(spec) {
  const view = await json('v1/jobs', { method: 'POST', headers: { 'Content-Type': 'application/json' },
                                       body: JSON.stringify(spec) });
  showError(null);
  return upsert(view);
}

async function cancel(job) {
  try {
    upsert(await json(`v1/jobs/${job.id}`, { method: 'DELETE' }));
    show(job);
  } catch (error) {
    showError(error);
  }
}

function applyDefaults() {
  const model = models.get(field('model').value);
  if (!model) return;
  localStorage.setItem('atelier.model', model.id);
  Object.assign(field('width'), { value: model.default_width, max: model.max_width });
  Object.assign(field('height'), { value: model.default_height, max: model.max_height });
  field('steps').value = model.default_steps;
  field('guidance').placeholder = `${model.default_guidance}`;
  Object.assign(field('count'), { max: model.max_count });
  Object.assign(field('frames'), { value: model.default_frames ?? '', max: model.max_frames ?? '' });
  field('fps').value = model.default_fps ?? '';
  Object.assign(field('duration_s'), { value: model.default_duration_s ?? '', max: model.max_duration_s ?? '' });
  if (!defaultKind(model, true)) field('image').value = '';
  // The ControlNets are the model's own: a name chosen for another model means nothing here.
  field('controlnet').replaceChildren(new Option('none', ''),
                                     ...controlnetsOf(model).map((name) => new Option(name, name)));
  if (!controlnetsOf(model).length) field('control_image').value = '';
  if (!model.ip_adapter) field('ip_adapter_image').value = '';
  fitForm();
}

async function loadModels() {
  models = new Map((await json('v1/models')).data.map((model) => [model.id, model]));
  field('model').replaceChildren(...[...models.keys()].map((id) => new Option(id, id)));
  const saved = localStorage.getItem('atelier.model');
  const fallback = [...models.values()].find((model) => model.default);
  if (models.has(saved)) field('model').value = saved;
  else if (fallback) field('model').value = fallback.id;
  applyDefaults();
}

// The caller's jobs as the scheduler remembers them: the gallery and the list survive a reload.
async function restore() {
  const views = (await json('v1/jobs?limit=100')).jobs;  // newest first
  let newest = null;
  for (const view of views.reverse()) {
    const job = upsert(view);
    if (superseded(job)) continue;
    newest = job;
    if (job.state === 'done') addToGallery(job);
    show(job);
    if (!terminal(job)) follow(job);
  }
  if (newest && !stageId) stage(newest);
}

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  try {
    const job = await submit(await specFromForm());
    show(job);
    stage(job);
    follow(job);
  } catch (error) {
    showError(error);
  }
});

$('#cancel').addEventListener('click', () => { const job = jobs.get(stageId); if (job) cancel(job); });
field('model').addEventListener('change', applyDefaults);
field('image').addEventListener('change', fitForm);
field('controlnet').addEventListener('change', fitForm);
field('ip_adapter_image').addEventListener('change', fitForm);

// -- live mode ---------------------------------------------------------------- //
// Each change submits the whole form as a live job of this tab's session; the scheduler replaces
// or stops the session's older job. Submits go one at a time, so the scheduler sees the prompts in
// the order they were typed, and the stage follows only the newest: an older job's late preview
// or image never shows as the latest.

let liveJob = null, liveSent = '', liveBusy = false, liveAgain = false, liveTimer = 0, liveSeed = 0;

function liveChanged(event) {
  if (!$('#live').checked || event.target.id === 'live') return;
  clearTimeout(liveTimer);
  liveTimer = setTimeout(submitLive, LIVE_DEBOUNCE_MS);
}

async function submitLive() {
  if (!$('#live').checked) return;
  if (liveBusy) { liveAgain = true; return; }
  liveBusy = true;
  try {
    const spec = { seed: liveSeed, ...await specFromForm(), priority: 'live', session };
    const key = JSON.stringify(spec);
    if (!spec.prompt.trim() || key === liveSent) return;
    const job = await submit(spec);
    liveSent = key;
    if (liveJob && liveJob !== job) liveJob.abort.abort();  // superseded: its stream has nothing left to say
    liveJob = job;
    stage(job);
    follow(job);
  } catch (error) {
    showError(error);
    if (error.status === 429) {  // rate limited or the queue is full: try the latest prompt again later
      clearTimeout(liveTimer);
      liveTimer = setTimeout(submitLive, error.retryAfter * 1000);
    }
  } finally {
    liveBusy = false;
    if (liveAgain) { liveAgain = false; submitLive(); }
  }
}

form.addEventListener('input', liveChanged);
$('#live').addEventListener('change', () => {
  document.body.classList.toggle('live', $('#live').checked);
  if (!$('#live').checked) return;
  // One seed while the user types, unless they chose one: the picture changes with the words, not by chance.
  liveSeed = crypto.getRandomValues(new Uint32Array(1))[0];
  liveSent = '';
  submitLive();
});

// -- the admin view ------------------------------------------------------------------ //
// For an admin only (GET /v1/me says so): the whole queue, the runners, the leases and the operator's
// controls. Drawn from the endpoints (GET /v1/jobs?all=1, /v1/nodes, /v1/admin/controls, /v1/leases)
// whenever a cluster event comes on GET /v1/events, after each action, and every ADMIN_POLL_MS while the
// tab is shown: a job's own transitions are not cluster events. A server without the operator's or the
// leases' routes (404) shows the rest.

const ADMIN_POLL_MS = 3000;
const ADMIN_EVENTS_KEPT = 20;
const LEASES_ENDED_SHOWN = 5;
const PRIORITIES = ['live', 'interactive', 'batch'];
const adminView = { on: false, abort: null, timer: 0, busy: null, again: false, rows: new Map() };

function mib(size) {
  if (size == null) return '';
  return size >= 1 << 30 ? `${(size / (1 << 30)).toFixed(1)} GiB` : `${(size / (1 << 20)).toFixed(1)} MiB`;
}

// A JSON answer, or null where the server has no such route (404).
async function optional(path) {
  const response = await api(path);
  if (response.status === 404) return null;
  if (!response.ok) throw await problem(response);
  return response.json();
}

async function startAdmin() {
  const me = await json('v1/me').catch(() => null);
  const on = !!(me && me.admin);
  $('#admin').hidden = !on;
  if (on === adminView.on) { if (on) refreshAdmin(); return; }
  adminView.on = on;
  if (on) {
    followCluster();
    refreshAdmin();
  } else {
    clearTimeout(adminView.timer);
    if (adminView.abort) adminView.abort.abort();
  }
}

// One refresh at a time; one asked for meanwhile runs once this one ends.
function refreshAdmin() {
  if (!adminView.on) return;
  if (adminView.busy) { adminView.again = true; return; }
  clearTimeout(adminView.timer);
  adminView.busy = (async () => {
    try {
      if (!document.hidden) {
        const [queue, nodes, controls, leases] = await Promise.all([
          json('v1/jobs?all=1&limit=100'), json('v1/nodes'), optional('v1/admin/controls'), optional('v1/leases')]);
        renderControls(controls);
        renderQueue(queue.jobs);
        renderRunners(nodes.runners, controls);
        renderCatalog(controls);
        renderLeases(leases);
      }
    } catch (error) {
      $('#admin-error').textContent = error.message;
    } finally {
      adminView.busy = null;
      if (adminView.on) adminView.timer = setTimeout(refreshAdmin, ADMIN_POLL_MS);
      if (adminView.again) { adminView.again = false; refreshAdmin(); }
    }
  })();
}

// An operator's action: its refusal is shown (the API's message says what to do), and the view redrawn.
async function act(path, method = 'POST', body = {}) {
  try {
    const init = method === 'DELETE' ? { method }
      : { method, headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) };
    const answer = await json(path, init);
    $('#admin-error').textContent = '';
    return answer;
  } catch (error) {
    $('#admin-error').textContent = error.message;
    return null;
  } finally {
    refreshAdmin();
  }
}

function button(text, onClick, label) {
  const element = document.createElement('button');
  Object.assign(element, { type: 'button', className: 'ghost', textContent: text });
  if (label) element.setAttribute('aria-label', label);
  element.addEventListener('click', onClick);
  return element;
}

function renderControls(controls) {
  const toggle = $('#queue-toggle');
  $('#catalog-reload').hidden = !controls;
  toggle.hidden = !controls;
  if (!controls) {
    $('#queue-state').textContent = 'Operator controls are not on this server';
    return;
  }
  $('#queue-state').textContent = controls.paused ? 'Queue paused' : 'Queue running';
  $('#queue-state').dataset.state = controls.paused ? 'paused' : 'running';
  toggle.textContent = controls.paused ? 'Resume queue' : 'Pause queue';
  toggle.dataset.paused = controls.paused ? 'true' : 'false';
}

$('#queue-toggle').addEventListener('click', (event) => {
  act(event.target.dataset.paused === 'true' ? 'v1/admin/resume' : 'v1/admin/pause');
});
$('#catalog-reload').addEventListener('click', async () => {
  const changes = await act('v1/admin/catalog/reload');
  if (!changes) return;
  const said = ['added', 'changed', 'removed'].filter((k) => changes[k] && changes[k].length)
    .map((k) => `${k} ${changes[k].join(', ')}`);
  $('#admin-live').textContent = `Catalog reloaded: ${said.join('; ') || 'nothing changed'}`;
  models = new Map((await json('v1/models')).data.map((model) => [model.id, model]));
});

// The jobs on the runners, then the queue in the order it would start: each row kept across redraws
// (a priority being chosen is not closed under the admin's hand).
function renderQueue(views) {
  const list = $('#admin-queue');
  const live = views.filter((view) => !TERMINAL.has(view.state));
  $('#queue-count').textContent = live.length ? `(${live.length})` : '';
  const seen = new Set();
  for (const view of live) {
    const id = view.spec.id;
    seen.add(id);
    let li = adminView.rows.get(id);
    if (!li) {
      li = document.createElement('li');
      li.dataset.job = id;
      li.innerHTML = '<div class="text"><span class="prompt"></span><span class="meta"></span></div>' +
                     '<div class="row-actions"></div>';
      const priority = document.createElement('select');
      priority.setAttribute('aria-label', `Priority of job ${id}`);
      priority.append(...PRIORITIES.map((p) => new Option(p, p)));
      priority.addEventListener('change', () => act(`v1/jobs/${id}/priority`, 'POST', { priority: priority.value }));
      li.querySelector('.row-actions').append(priority,
        button('To front', () => act(`v1/jobs/${id}/front`), `Move job ${id} to the front`),
        button('Cancel', () => act(`v1/jobs/${id}`, 'DELETE'), `Cancel job ${id}`));
      adminView.rows.set(id, li);
    }
    li.dataset.state = view.state;
    li.querySelector('.prompt').textContent = view.spec.prompt;
    const where = view.state === 'queued' ? (view.position != null ? `#${view.position + 1}` : 'queued')
      : `${view.state}${view.runner ? ` on ${view.runner}` : ''}`;
    li.querySelector('.meta').textContent = [id, view.spec.user, view.spec.model, where].join(' · ');
    const priority = li.querySelector('select');
    if (document.activeElement !== priority) priority.value = view.spec.priority;
    priority.hidden = view.state !== 'queued';
    li.querySelector('[aria-label^="Move job"]').hidden = view.state !== 'queued';
    list.append(li);  // in the order given: a row that moved goes to its new place
  }
  for (const [id, li] of adminView.rows) {
    if (!seen.has(id)) { li.remove(); adminView.rows.delete(id); }
  }
}

// The runners by node, each node with its state and drain or resume (operator controls).
function renderRunners(runners, controls) {
  const nodes = new Map();
  for (const runner of runners) {
    const node = runner.capabilities.node || '-';
    if (!nodes.has(node)) nodes.set(node, []);
    nodes.get(node).push(runner);
  }
  const items = [];
  for (const [node, members] of [...nodes].sort(([a], [b]) => a.localeCompare(b))) {
    const head = document.createElement('li');
    head.className = 'node';
    head.dataset.node = node;
    const state = controls && controls.nodes ? controls.nodes[node] || 'serving' : null;
    const title = document.createElement('span');
    title.className = 'prompt';
    title.textContent = state ? `${node} · ${state}` : node;
    head.append(title);
    if (state && node !== '-') {
      const draining = state !== 'serving';
      head.append(button(draining ? 'Resume node' : 'Drain node',
                         () => act(`v1/admin/nodes/${encodeURIComponent(node)}/${draining ? 'resume' : 'drain'}`),
                         `${draining ? 'Resume' : 'Drain'} node ${node}`));
    }
    items.push(head);
    for (const runner of members.sort((a, b) => a.name.localeCompare(b.name))) {
      const caps = runner.capabilities;
      const li = document.createElement('li');
      li.className = 'runner';
      li.dataset.runner = runner.name;
      const busy = runner.job || (caps.active_jobs && caps.active_jobs[0]);
      li.dataset.state = busy ? 'busy' : 'idle';
      const resident = Object.entries(caps.resident || {}).map(([model, size]) => `${model} (${mib(size)})`);
      // Budget and leased bytes, where the runner reports them (a VRAM lease makes the budget smaller).
      // 0 (or absent): not reported.
      const memory = [caps.budget_bytes && `budget ${mib(caps.budget_bytes)}`
                        + (caps.full_budget_bytes > caps.budget_bytes ? ` of ${mib(caps.full_budget_bytes)}` : ''),
                      caps.leased_bytes && `leased ${mib(caps.leased_bytes)}`].filter(Boolean);
      li.innerHTML = '<div class="text"><span class="prompt"></span><span class="meta"></span></div>';
      li.querySelector('.prompt').textContent =
        `${runner.name} · ${caps.device_name || caps.device || '-'} · ${busy ? `running ${busy}` : 'idle'}`;
      li.querySelector('.meta').textContent = [resident.join(', ') || 'nothing resident', ...memory].join(' · ');
      items.push(li);
    }
  }
  $('#admin-runners').replaceChildren(...items);
}

// The catalog's models, each with pause or resume (operator controls).
function renderCatalog(controls) {
  $('#admin-models-block').hidden = !controls;
  if (!controls) return;
  const paused = new Set(controls.paused_models || []);
  $('#admin-models').replaceChildren(...[...models.keys()].map((name) => {
    const li = document.createElement('li');
    li.dataset.model = name;
    li.dataset.state = paused.has(name) ? 'paused' : 'serving';
    const text = document.createElement('span');
    text.className = 'prompt';
    text.textContent = paused.has(name) ? `${name} · paused` : name;
    li.append(text, button(paused.has(name) ? 'Resume' : 'Pause',
                           () => act(paused.has(name) ? 'v1/admin/resume' : 'v1/admin/pause', 'POST', { model: name }),
                           `${paused.has(name) ? 'Resume' : 'Pause'} ${name}`));
    return li;
  }));
}

function renderLeases(answer) {
  $('#admin-leases-block').hidden = !answer;
  if (!answer) return;
  const now = Date.now() / 1000;
  // Those held or waiting, then the few that ended last (with why): the list does not grow for ever.
  const ended = answer.leases.filter((lease) => lease.state === 'ended').slice(-LEASES_ENDED_SHOWN);
  const shown = [...answer.leases.filter((lease) => lease.state !== 'ended'), ...ended.reverse()];
  $('#admin-leases').replaceChildren(...shown.map((lease) => {
    const li = document.createElement('li');
    li.dataset.lease = lease.id;
    li.dataset.state = lease.state;
    li.innerHTML = '<div class="text"><span class="prompt"></span><span class="meta"></span></div>';
    li.querySelector('.prompt').textContent =
      `${lease.holder} · ${mib(lease.bytes)} on ${lease.node ? `${lease.node} ` : ''}${lease.device} · ${lease.state}`;
    li.querySelector('.meta').textContent = [
      lease.id, lease.urgent && 'urgent', lease.freed_bytes && `freed ${mib(lease.freed_bytes)}`,
      lease.expires_at && lease.state !== 'ended' && `ends in ${seconds(lease.expires_at - now)}`,
      lease.ended_reason].filter(Boolean).join(' · ');
    if (lease.state !== 'ended') {
      li.append(button('End lease', () => act(`v1/leases/${encodeURIComponent(lease.id)}`, 'DELETE'),
                       `End lease ${lease.id}`));
    }
    return li;
  }));
}

// GET /v1/events for as long as the admin view is on: each event is listed and redraws the view.
async function followCluster() {
  const abort = adminView.abort = new AbortController();
  for (let attempt = 0; adminView.on && !abort.signal.aborted; attempt++) {
    try {
      const response = await api('v1/events', { signal: abort.signal });
      if (!response.ok) throw await problem(response);
      attempt = 0;
      await readStream(response, (_, event) => onClusterEvent(event));
    } catch (error) {
      if (abort.signal.aborted || error.status === 403 || error.status === 404) return;
    }
    await sleep(Math.min(10000, 500 * 2 ** attempt));
  }
}

function onClusterEvent(event) {
  const li = document.createElement('li');
  li.dataset.event = event.event;
  const detail = Object.entries(event.detail || {}).map(([k, v]) => `${k}=${v}`).join(' ');
  const when = new Date(event.at * 1000).toLocaleTimeString();
  li.textContent = `${when} ${event.event.replaceAll('_', ' ')}${detail ? ` · ${detail}` : ''}`;
  const list = $('#admin-events');
  list.prepend(li);
  while (list.children.length > ADMIN_EVENTS_KEPT) list.lastElementChild.remove();
  $('#admin-live').textContent = `Last event: ${event.event.replaceAll('_', ' ')}`;
  refreshAdmin();
}

document.addEventListener('visibilitychange', () => { if (!document.hidden) refreshAdmin(); });

// -- the token button, the viewer, start ------------------------------------------ //

$('#token-button').addEventListener('click', () => askToken('The token this server gave you, if it needs one.')
  .then(() => start(), () => {}));
$('#viewer').addEventListener('click', (event) => { if (event.target.id === 'viewer') $('#viewer').close(); });

async function start() {
  try {
    await loadModels();
    await restore();
    showError(null);
    await startAdmin();
  } catch (error) {
    showError(error);
  }
}

start();
