#!/usr/bin/env node
// Claude Code's OAuth refresh lock, driven the way the shipped CLI drives it: the real npm package
// `proper-lockfile` on the config directory (lock = `<realpath(dir)>.lock`, a directory made with
// mkdir), stale after 10 s, mtime refreshed every 5 s, up to 5 retries 1-2 s apart on ELOCKED.
// Inside the lock the CLI re-reads `.credentials.json` and refreshes only if the token still expires
// within five minutes. Every step is printed as one JSON line on stdout for the tests to follow.
//
//   node claude-lock.js hold DIR SECONDS [ACCESS REFRESH EXPIRES_IN]   lock, (write a new login), wait, unlock
//   node claude-lock.js crash DIR                                     lock, then die by SIGKILL (lock left behind)
//   node claude-lock.js refresh DIR TOKEN_URL                         lock, re-read, refresh if expiring, unlock
'use strict';

const fs = require('fs');
const path = require('path');
const lockfile = require('proper-lockfile');

const CLIENT_ID = '9d1c250a-e61b-44d9-88ed-5944d1962f5e';
const MARGIN_MS = 5 * 60 * 1000;
const OPTIONS = {
    stale: 10000,
    update: 5000,
    realpath: true,
    retries: { retries: 5, minTimeout: 1000, maxTimeout: 2000 },
    onCompromised: (err) => { say('compromised', { message: err.message }); process.exit(3); },
};

function say(event, extra = {}) {
    process.stdout.write(JSON.stringify({ event, t: Date.now(), ...extra }) + '\n');
}

function credentialsPath(dir) {
    return path.join(dir, '.credentials.json');
}

function readLogin(dir) {
    return JSON.parse(fs.readFileSync(credentialsPath(dir), 'utf8'));
}

function writeLogin(dir, document) {
    const target = credentialsPath(dir);
    const tmp = `${target}.node-${process.pid}`;
    fs.writeFileSync(tmp, JSON.stringify(document, null, 2), { mode: 0o600 });
    fs.renameSync(tmp, target);
}

async function lock(dir) {
    try {
        const release = await lockfile.lock(dir, OPTIONS);
        say('locked', { lock: `${fs.realpathSync(dir)}.lock` });
        return release;
    } catch (err) {
        say('lock_failed', { code: err.code || '', message: err.message });
        process.exit(2);
    }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function hold(dir, seconds, access, refresh, expiresIn) {
    const release = await lock(dir);
    await sleep(Number(seconds) * 1000);
    if (access) {
        const document = readLogin(dir);
        Object.assign(document.claudeAiOauth, {
            accessToken: access,
            refreshToken: refresh,
            expiresAt: Date.now() + Number(expiresIn) * 1000,
        });
        writeLogin(dir, document);
        say('wrote');
    }
    await release();
    say('released');
}

async function crash(dir) {
    await lock(dir);
    process.kill(process.pid, 'SIGKILL');
}

async function refresh(dir, tokenUrl) {
    const release = await lock(dir);
    try {
        const document = readLogin(dir);
        const oauth = document.claudeAiOauth;
        if (oauth.expiresAt - Date.now() > MARGIN_MS) {
            say('adopted', { expires_at: oauth.expiresAt });
            return;
        }
        const response = await fetch(tokenUrl, {
            method: 'POST',
            headers: { 'Content-Type': 'application/json', 'anthropic-beta': 'oauth-2025-04-20' },
            body: JSON.stringify({
                grant_type: 'refresh_token',
                refresh_token: oauth.refreshToken,
                client_id: CLIENT_ID,
                scope: (oauth.scopes || []).join(' '),
            }),
        });
        const answer = await response.json();
        if (response.status !== 200) {
            say('refresh_failed', { status: response.status, error: answer.error || '' });
            return;
        }
        oauth.accessToken = answer.access_token;
        oauth.refreshToken = answer.refresh_token || oauth.refreshToken;
        oauth.expiresAt = Date.now() + answer.expires_in * 1000;
        writeLogin(dir, document);
        say('refreshed');
    } finally {
        await release();
        say('released');
    }
}

const [mode, dir, ...rest] = process.argv.slice(2);
const modes = { hold, crash, refresh };
if (!modes[mode] || !dir) {
    process.stderr.write('usage: claude-lock.js hold|crash|refresh DIR ...\n');
    process.exit(64);
}
modes[mode](dir, ...rest).catch((err) => { say('error', { message: String(err) }); process.exit(1); });
