/**
 * Uploading a release's planned assets, a few at a time, each upload recorded in the release
 * body (which copy holds which bytes) as it finishes. What to upload is planned in
 * release_index.ts; this uploads and records, and deletes nothing.
 */
import { type Attachment, type Release } from "../../types/forgejo.ts";
import { type Run } from "./run.ts";
import { type BundleAsset, type Forgejo, sayingWhatIsLeft, uploadAsset } from "./forgejo.ts";
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
