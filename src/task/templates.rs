//! Tasks and their questions (interfaces.md §2-§3, architecture notes §13). Where the original
//! code picks a template at random, the FIRST template of each list is used.

use super::prompt::normalize_class_name;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Task {
    #[default]
    Conversation,
    Semantic,
    Instance,
    Panoptic,
    Referring,
    Reasoning,
    Gcg,
    Interactive,
    Vgd,
}

pub const TASK_NAMES: &[&str] = &[
    "conversation",
    "semantic",
    "instance",
    "panoptic",
    "referring",
    "reasoning",
    "gcg",
    "interactive",
    "vgd",
];

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Task> {
        Ok(match s.trim() {
            "conversation" => Task::Conversation,
            "semantic" => Task::Semantic,
            "instance" => Task::Instance,
            "panoptic" => Task::Panoptic,
            "referring" => Task::Referring,
            "reasoning" => Task::Reasoning,
            "gcg" => Task::Gcg,
            "interactive" => Task::Interactive,
            "vgd" => Task::Vgd,
            other => {
                return Err(Error::Input(format!(
                    "unknown task `{other}` (expected one of: {})",
                    TASK_NAMES.join(", ")
                )))
            }
        })
    }
}

impl Task {
    pub fn name(self) -> &'static str {
        TASK_NAMES[self as usize]
    }

    /// Tasks that produce masks (all but conversation).
    pub fn segments(self) -> bool {
        self != Task::Conversation
    }

    /// Tasks whose classes are visual prompts.
    pub fn uses_regions(self) -> bool {
        matches!(self, Task::Interactive | Task::Vgd)
    }
}

/// The answer forced after the prompt in `forced` mode when none is given (interfaces.md §2).
pub const DEFAULT_FORCED_ANSWER: &str = "Sure, <SEG>.";

/// `<p>a</p>, <p>b</p>` for class names as they enter the prompt.
pub fn class_list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("<p>{}</p>", normalize_class_name(n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `<p><region></p>, ...` for `n` visual prompts.
pub fn region_list(n: usize) -> String {
    vec!["<p><region></p>"; n].join(", ")
}

/// What a request asks, before it becomes a question.
#[derive(Debug, Clone, Default)]
pub struct QuestionInput<'a> {
    /// Things (or all classes for semantic / instance), in the user's order.
    pub classes: &'a [String],
    /// Stuff classes (panoptic; appended after `classes` for semantic / instance).
    pub stuff: &'a [String],
    /// The question, expression or sentence.
    pub text: Option<&'a str>,
    /// Number of visual prompts.
    pub regions: usize,
}

/// The question placed after `<image>\n` in the chat prompt, with its checks on the inputs.
pub fn question(task: Task, q: &QuestionInput) -> Result<String> {
    let need_text = |what: &str| -> Result<&str> {
        match q.text.map(str::trim) {
            Some(t) if !t.is_empty() => Ok(t),
            _ => Err(Error::Input(format!(
                "task `{}` needs --prompt ({what})",
                task.name()
            ))),
        }
    };
    let all_classes = || -> Result<Vec<String>> {
        let all: Vec<String> = q.classes.iter().chain(q.stuff.iter()).cloned().collect();
        if all.is_empty() {
            return Err(Error::Input(format!(
                "task `{}` needs --classes",
                task.name()
            )));
        }
        if let Some(i) = all
            .iter()
            .position(|c| normalize_class_name(c).trim().is_empty())
        {
            return Err(Error::Input(format!("class name {} is empty", i + 1)));
        }
        Ok(all)
    };
    let need_regions = || -> Result<usize> {
        if q.regions == 0 {
            return Err(Error::Input(format!(
                "task `{}` needs at least one --vprompt",
                task.name()
            )));
        }
        Ok(q.regions)
    };
    Ok(match task {
        Task::Conversation => need_text("the question")?.to_string(),
        Task::Semantic | Task::Instance | Task::Panoptic => {
            if task == Task::Panoptic && (q.classes.is_empty() || q.stuff.is_empty()) {
                return Err(Error::Input("task `panoptic` needs both --classes (things) and --stuff".into()));
            }
            format!(
                "Can you segment the image based on the following categories: {}? Please output the segmentation masks.",
                class_list(&all_classes()?)
            )
        }
        Task::Referring => format!(
            "Please identify and segment the <p>{}</p> in this image.",
            need_text("the referring expression")?.to_lowercase()
        ),
        Task::Reasoning => format!(
            "<p>{}</p> Please output the corresponding segmentation mask.",
            need_text("the sentence")?
        ),
        Task::Gcg => "Could you please give me a brief description of the image? Please respond with interleaved segmentation masks for the corresponding parts of the answer.".to_string(),
        Task::Interactive | Task::Vgd => {
            let n = need_regions()?;
            if task == Task::Interactive && n != 1 {
                return Err(Error::Input(format!("task `interactive` takes exactly one --vprompt, got {n}")));
            }
            format!(
                "Can you segment the image based on the following regions: {}? Please output the corresponding segmentation mask.",
                region_list(n)
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_follow_the_first_templates() {
        let classes = vec!["Person".to_string(), "traffic-light".to_string()];
        let stuff = vec!["wall-other-merged".to_string()];
        let q = QuestionInput {
            classes: &classes,
            stuff: &stuff,
            ..Default::default()
        };
        assert_eq!(
            question(Task::Panoptic, &q).unwrap(),
            "Can you segment the image based on the following categories: <p>person</p>, <p>traffic light</p>, <p>wall</p>? Please output the segmentation masks."
        );
        let q = QuestionInput {
            text: Some("  The Dog "),
            ..Default::default()
        };
        assert_eq!(
            question(Task::Referring, &q).unwrap(),
            "Please identify and segment the <p>the dog</p> in this image."
        );
        assert_eq!(
            question(Task::Reasoning, &q).unwrap(),
            "<p>The Dog</p> Please output the corresponding segmentation mask."
        );
        let q = QuestionInput {
            regions: 2,
            ..Default::default()
        };
        assert!(question(Task::Vgd, &q)
            .unwrap()
            .contains("<p><region></p>, <p><region></p>?"));
        assert!(question(Task::Interactive, &q).is_err());
    }

    #[test]
    fn missing_inputs_are_errors() {
        let empty = QuestionInput::default();
        for t in [
            Task::Conversation,
            Task::Semantic,
            Task::Referring,
            Task::Vgd,
            Task::Panoptic,
        ] {
            assert!(question(t, &empty).is_err(), "{t:?}");
        }
        let blank = vec![" - ".to_string()];
        let q = QuestionInput {
            classes: &blank,
            ..Default::default()
        };
        assert!(question(Task::Semantic, &q)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!("segment".parse::<Task>().is_err());
        assert_eq!("gcg".parse::<Task>().unwrap(), Task::Gcg);
    }
}
