// One cleanup for every test file: `after(cleanup)` kills the processes, closes the test
// backends and client sockets, and removes the temp files the file created.
import { removeTempDirs } from './config.mjs';
import { destroyClients } from './http.mjs';
import { checkNoUnexpectedExits, killAllProcesses, noteTest } from './procs.mjs';
import { stopAllBackends } from './backend.mjs';
import { stopAllWebhooks } from './webhook.mjs';

export async function cleanup() {
  destroyClients();
  // Give a crash that happened during the last test a name before everything is killed.
  let crash = null;
  try {
    checkNoUnexpectedExits();
  } catch (err) {
    crash = err;
  }
  await killAllProcesses();
  await stopAllBackends();
  await stopAllWebhooks();
  removeTempDirs();
  if (crash) throw crash;
}

// For afterEach(): fails the test during which a gateway or mock died on its own (the report
// names the test that started the process, in case the crash was only noticed later).
export function checkProcesses() {
  checkNoUnexpectedExits({ scope: 'test' });
}

// For beforeEach().
export function trackTest(t) {
  noteTest(t);
}

export * from './util.mjs';
export * from './config.mjs';
export * from './http.mjs';
export * from './procs.mjs';
export * from './backend.mjs';
export * from './webhook.mjs';
