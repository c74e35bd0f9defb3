//! The paged manifest of an export kicked off with `allowPartialManifests=true` (Bulk Data
//! STU3): page 1 at the status URL, page n at `?page=n`, each linked to the next by `link`.
//!
//! A page is made the first time it is needed and never changes after: it lists the files
//! complete then (at most `export.manifest_page_size`, a block split over files with all its
//! files, and only once the last of them is complete). Serving the last page makes the next
//! one from the files completed since, so the page served links to it; a client follows
//! `next` until a page without one, re-polling that page while the export runs. Pages live in
//! Postgres, so every replica serves the same pages.

use super::{Error, Exporter, manifest::Manifest};
use crate::db::{
    jobs::Job,
    pages::{self, Unpublished},
};

/// The files of one page: whole chains of files a block spans.
type PageFiles = Vec<(String, i32)>;

impl Exporter {
    /// Page `number` of a job's manifest, making the pages that files completed since call
    /// for. `None`: no file is complete yet (no page exists).
    pub(super) async fn manifest_page(
        &self,
        job: &Job,
        number: i32,
    ) -> Result<Option<Manifest>, Error> {
        let no_page =
            || Error::NotFound(format!("export {} has no manifest page {number}", job.id));
        let mut tx = self.pool.begin().await?;
        pages::lock(&mut tx, job.id).await?;
        let mut last = pages::last_page(&mut tx, job.id).await?;
        if number > last.max(1) {
            return Err(no_page());
        }
        if number == last || last == 0 {
            let mut ready = publishable(pages::unpublished(&mut tx, job.id).await?);
            // The first page, then the page after the one asked for, so that it links there.
            while !ready.is_empty() && last <= number {
                last += 1;
                let files = take_page(&mut ready, self.config.export.manifest_page_size);
                pages::publish(&mut tx, job.id, last, &files).await?;
            }
        }
        tx.commit().await?;
        if last == 0 {
            return Ok(None);
        }
        let files = pages::files(&self.pool, job.id, number).await?;
        let mut manifest = self.manifest_of(job, &files).await?;
        if number < last {
            manifest.next = Some(format!(
                "{}/export/{}?page={}",
                self.base_url,
                job.id,
                number + 1
            ));
        }
        Ok(Some(manifest))
    }
}

/// The files that may be published, in order, grouped so that a file whose last block goes on
/// in another comes with it: a chain is ready once its last file (one that does not continue)
/// is complete.
fn publishable(files: Vec<Unpublished>) -> Vec<PageFiles> {
    use std::collections::HashMap;
    let index: HashMap<(i64, i32), usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| ((f.task_id, f.task_seq), i))
        .collect();
    let continued = |f: &Unpublished| {
        index
            .get(&(f.task_id, f.task_seq - 1))
            .is_some_and(|&i| files[i].continues)
    };
    let mut groups = Vec::new();
    'heads: for head in files.iter().filter(|f| !continued(f)) {
        let mut chain = vec![(head.resource_type.clone(), head.part_no)];
        let mut file = head;
        while file.continues {
            match index.get(&(file.task_id, file.task_seq + 1)) {
                Some(&next) => file = &files[next],
                None => continue 'heads, // its continuation is not complete yet
            }
            chain.push((file.resource_type.clone(), file.part_no));
        }
        groups.push(chain);
    }
    groups
}

/// Takes the next page's files off `ready`: whole groups, at least one, up to `size` files.
fn take_page(ready: &mut Vec<PageFiles>, size: i64) -> PageFiles {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    let mut page = Vec::new();
    while let Some(group) = ready.first() {
        if !page.is_empty() && page.len() + group.len() > size {
            break;
        }
        page.extend(ready.remove(0));
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(kind: &str, part_no: i32, task: (i64, i32), continues: bool) -> Unpublished {
        Unpublished {
            resource_type: kind.into(),
            part_no,
            task_id: task.0,
            task_seq: task.1,
            continues,
        }
    }

    #[test]
    fn a_split_block_is_published_with_all_its_files_once_the_last_is_complete() {
        let files = vec![
            file("Observation", 1, (1, 0), false),
            // Task 2's block spans files 1-3; task 3's spans 4 and a file not yet complete.
            file("Patient-blocks", 1, (2, 0), true),
            file("Patient-blocks", 2, (3, 0), false),
            file("Patient-blocks", 3, (2, 1), true),
            file("Patient-blocks", 4, (3, 1), true),
            file("Patient-blocks", 5, (2, 2), false),
        ];
        let groups = publishable(files);
        let names: Vec<Vec<String>> = groups
            .iter()
            .map(|g| g.iter().map(|(k, n)| format!("{k}-{n}")).collect())
            .collect();
        assert_eq!(
            names,
            vec![
                vec!["Observation-1".to_string()],
                vec![
                    "Patient-blocks-1".into(),
                    "Patient-blocks-3".into(),
                    "Patient-blocks-5".into()
                ],
                vec!["Patient-blocks-2".into()],
            ]
        );
    }

    #[test]
    fn a_page_takes_whole_groups_up_to_its_size_and_at_least_one() {
        let group = |n: i32| -> PageFiles { (0..n).map(|i| ("T".to_string(), i)).collect() };
        let mut ready = vec![group(2), group(2), group(5), group(1)];
        assert_eq!(take_page(&mut ready, 5).len(), 4);
        assert_eq!(
            take_page(&mut ready, 3).len(),
            5,
            "a group larger than a page is whole"
        );
        assert_eq!(take_page(&mut ready, 3).len(), 1);
        assert!(ready.is_empty());
    }
}
