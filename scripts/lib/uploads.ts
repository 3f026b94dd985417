/**
 * Uploading a release's planned assets, a few at a time, each upload recorded in the release
 * body (which copy holds which bytes) as it finishes; and what a run that fails part-way leaves
 * of a release: a draft as it is, a published release put back as it was. What to upload is
 * planned in release_index.ts; this deletes, from a published release, only copies added since
 * this run began (another job's upload to the same release in that time included).
 */
import { type Attachment, type Release } from "../../types/forgejo.ts";
import { ReleaseError, type Run } from "./run.ts";
import { type BundleAsset, deleteAsset, type Forgejo, uploadAsset } from "./forgejo.ts";
import { type PlannedAction, readUploadRecord, withUploadRecord } from "./release_index.ts";
import { inLanes } from "./lanes.ts";

/**
 * `lanes` uploads at a time, each recorded as it finishes. After a failure none starts, and
 * it is reported once those under way have finished: a draft keeps them for a rerun to skip.
 */
export async function uploadPlanned(
  run: Run,
  forgejo: Forgejo,
  release: Release,
  plan: PlannedAction[],
  lanes: number,
): Promise<void> {
  const uploads = plan.filter((action) => action.kind === "upload");
  for (const action of plan) {
    if (action.kind === "skip") run.log(`${action.asset.name}: already in the release, skipped`);
  }
  let done = 0;
  let recorded = Promise.resolve();
  await sayingWhatIsLeft(
    run,
    forgejo,
    release,
    () =>
      inLanes(uploads, lanes, async (action) => {
        const stored = await uploadAsset(run, forgejo, release.id, action.asset, release.assets);
        // Each record rewrites the release body: one at a time, or one would undo another.
        recorded = recorded.then(() => recordUpload(forgejo, release.id, action.asset, stored));
        await recorded;
        done++;
      }),
    () => `${done} of ${uploads.length} uploads had finished and `,
  );
}

async function recordUpload(
  forgejo: Forgejo,
  releaseId: number,
  asset: BundleAsset,
  stored: Attachment,
): Promise<void> {
  const release = await forgejo.releases.get(releaseId);
  const record = readUploadRecord(release.body);
  record[asset.name] = { id: stored.id, size: stored.size, sha256: asset.sha256 };
  await forgejo.releases.edit(releaseId, { body: withUploadRecord(release.body, record) });
}

/**
 * Runs `work` on `release`; a failure part-way also says what it leaves behind. A draft stays
 * as it is; a published release is put back as it was when that is still possible.
 * `progress`, asked once the work has failed, says how far it got, when that helps.
 */
export async function sayingWhatIsLeft<T>(
  run: Run,
  forgejo: Forgejo,
  release: Release,
  work: () => Promise<T>,
  progress = () => "",
): Promise<T> {
  try {
    return await work();
  } catch (error) {
    if (!(error instanceof ReleaseError)) throw error;
    if (release.draft) {
      throw new ReleaseError(
        `${error.message}; ${progress()}the release stays a draft: rerun the same command to resume`,
      );
    }
    const removed = await takeBackUploads(run, forgejo, release).catch((failure) => {
      if (failure instanceof ReleaseError) return undefined;
      throw failure;
    });
    const copies = removed === 1 ? "copy this run uploaded was" : "copies this run uploaded were";
    const left = removed === undefined
      ? `${progress()}the published release ${release.tag_name} still has its SHA256SUMS and every copy it lists (new copies may sit beside them)`
      : `the published release ${release.tag_name} is as it was${
        removed > 0 ? `: the ${removed} ${copies} deleted again` : ""
      }`;
    throw new ReleaseError(`${error.message}; ${left}; rerun the same command to finish`);
  }
}

/**
 * Takes back what a run uploaded to a published release it could not finish: every copy added
 * since `before` is deleted and the body (its upload record) restored, so the release holds
 * exactly its previous files again. Only while none of those is gone (undefined otherwise: a
 * new SHA256SUMS replaced the old one). Returns how many copies went.
 */
async function takeBackUploads(
  run: Run,
  forgejo: Forgejo,
  before: Release,
): Promise<number | undefined> {
  const now = await forgejo.releases.get(before.id);
  if (before.assets.some((copy) => !now.assets.some((kept) => kept.id === copy.id))) {
    return undefined;
  }
  const added = now.assets.filter((copy) => !before.assets.some((old) => old.id === copy.id));
  for (const copy of added) {
    await deleteAsset(run, forgejo, before.id, copy, "a copy of an unfinished replacement");
  }
  if (now.body !== before.body) await forgejo.releases.edit(before.id, { body: before.body });
  return added.length;
}
