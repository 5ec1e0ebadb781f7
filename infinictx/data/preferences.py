"""Preference pairs whose preference a context reverses (the shape of RPR, arXiv 2407.14916), built offline.

Each pair is one prompt with two responses that carry the same content in two styles along one dimension
(concise vs detailed, formal vs casual, list vs prose, cautious vs direct, with vs without an example,
technical vs plain, and eight more in `DIMENSIONS`), so neither is better without a context. Two contexts
reverse the preference: under the `x` contexts response_a is preferred, under the `y` contexts response_b — as
stated criteria ("The user wants the short answer.") and as scenarios the criterion must be inferred from ("The
user is reading on a phone between meetings."). The columns are RPR's: prompt, response_a, response_b,
criteria_x, criteria_y, scenario_x, scenario_y, plus `dimension` and `split`.

Held out for testing: whole dimensions (`TEST_DIMENSIONS`) and, for the other dimensions, some phrasings of the
contexts. Adversarial rows: a response that does not answer the prompt against one that does, with an irrelevant
or nonsense context: the prompt alone decides them (`label` says which response is right under every context).
Relevance rows (training only): an on-topic answer in the style the context argues against beats an off-topic one
in the style it asks for; they teach that a context weighs only between answers that both answer the prompt.

`read_rpr` loads the real RPR layout from a CSV / JSONL / parquet for users who have it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InfinictxError

# prompt, its facts (the content every response carries), an example
TOPICS = [
    ("How do I keep bread fresh?", ["store it in a paper bag or a bread box", "keep it away from the fridge, where "
     "it goes stale faster", "freeze slices you will not eat within two days"], "a sourdough loaf keeps three days "
     "in a cloth bag"),
    ("How can I sleep better?", ["keep a fixed bedtime", "avoid screens for the last hour", "keep the bedroom cool "
     "and dark"], "going to bed at 22:30 every night, weekends included"),
    ("How do I start running?", ["begin with short intervals of running and walking", "run three times a week",
     "increase the distance by about ten percent a week"], "one minute of running, two of walking, eight times"),
    ("How do I water a cactus?", ["water only when the soil is completely dry", "soak the soil, then let it "
     "drain", "water far less in winter"], "once every two weeks in summer and once a month in winter"),
    ("How do I make a good cup of tea?", ["use freshly boiled water", "steep black tea for three to five minutes",
     "remove the leaves so it does not turn bitter"], "a teaspoon of Assam in 250 ml of water for four minutes"),
    ("How should I prepare for a job interview?", ["research the company", "prepare short stories about your past "
     "work", "have questions ready for the interviewer"], "asking how the team measures success in the first year"),
    ("How do I learn a new language faster?", ["practise a little every day", "speak with native speakers early",
     "learn the most common words first"], "fifteen minutes of flashcards each morning"),
    ("How do I remove a coffee stain?", ["blot the stain, do not rub it", "rinse with cold water from the back",
     "treat it with a little dish soap before washing"], "a drop of dish soap on a cotton shirt, then a cold wash"),
    ("How do I save money on groceries?", ["plan meals for the week", "shop with a list", "buy store brands and "
     "seasonal produce"], "cooking a large pot of soup on Sunday for three lunches"),
    ("How do I keep houseplants alive?", ["match each plant to the light it needs", "water when the top of the "
     "soil is dry", "use pots with drainage holes"], "a snake plant in a dim corner watered every three weeks"),
    ("How do I write a clear email?", ["put the request in the first sentence", "keep paragraphs short", "end "
     "with the next step and a date"], "'Could you send the figures by Friday?' as the opening line"),
    ("How do I back up my photos?", ["keep at least two copies", "store one copy in another place", "check now "
     "and then that the backups open"], "an external drive at home and a cloud folder"),
    ("How do I clean a cast iron pan?", ["wash it with hot water and a brush", "dry it at once on the stove",
     "rub in a thin layer of oil"], "two drops of sunflower oil spread with a paper towel"),
    ("How do I remember names at a party?", ["repeat the name when you hear it", "link it to something about the "
     "person", "use it once more before you leave"], "'Nice to meet you, Clara' right after the introduction"),
    ("How do I reduce stress at work?", ["take short breaks every hour", "write down tomorrow's tasks before "
     "leaving", "say no to tasks you cannot take on"], "a five-minute walk after each long meeting"),
    ("How do I choose a ripe avocado?", ["press gently near the stem", "it should yield a little", "avoid ones with "
     "dents or very soft spots"], "one that gives slightly, like a ripe peach"),
    ("How do I stop procrastinating?", ["break the task into small steps", "start with five minutes", "remove "
     "distractions like the phone"], "writing only the first paragraph of the report"),
    ("How do I care for leather boots?", ["brush off dirt after wearing", "condition the leather every few "
     "months", "let wet boots dry slowly, away from heaters"], "stuffing them with newspaper to dry overnight"),
    ("How do I plan a budget?", ["list your income", "list fixed costs first", "set a limit for each other "
     "category"], "a limit of 300 for food and 100 for going out each month"),
    ("How do I make rice fluffy?", ["rinse the rice until the water is clear", "use the right amount of water",
     "let it rest covered after cooking"], "one cup of rice to one and a half cups of water, ten minutes of rest"),
    ("How do I get better at public speaking?", ["rehearse out loud", "know your opening by heart", "pause instead "
     "of filling silence"], "recording yourself once and watching it back"),
    ("How do I keep my laptop battery healthy?", ["avoid keeping it at full charge all day", "keep it cool",
     "update the system regularly"], "charging to about eighty percent when plugged in at a desk"),
    ("How do I fix a squeaky door?", ["find the hinge that squeaks", "lubricate the hinge pin", "open and close "
     "the door to spread it"], "a few drops of oil on the top hinge pin"),
    ("How do I pack a suitcase efficiently?", ["roll clothes instead of folding", "put heavy items near the "
     "wheels", "use small bags for cables and toiletries"], "rolled shirts along the bottom and shoes at the wheels"),
]

# dimension: (style a, style b, criteria for a, criteria for b, scenarios for a, scenarios for b), the four lists
# phrased in parallel (the k-th criteria for a and for b make one pair); the last phrasing of each list is held out
# for testing. Six phrasings per training dimension: with two, the first trained model learnt the phrasings rather
# than the dimension (held-out phrasings 0.72), and negations ("dislikes lists") were never seen in training
DIMENSIONS = {
    "length": ("concise", "detailed",
               ["The user wants the short answer.", "Keep it brief: the user only needs the gist.",
                "The user has no patience for long explanations.", "Answer in as few words as possible.",
                "The user asked for the quick version.", "The user prefers answers of one or two sentences."],
               ["The user wants a thorough, complete answer.", "The user wants every step explained.",
                "The user finds short answers unhelpful.", "Explain it in depth, with the reasons.",
                "The user asked for the full explanation.", "The user prefers long, detailed answers."],
               ["The user is reading on a phone between two meetings.", "The user is in a hurry at the station.",
                "The user has ten seconds before the bus leaves.", "The answer is shown on a smartwatch.",
                "The user is skimming between tasks at work.", "The user glances at the answer while cooking dinner."],
               ["The user is writing a detailed guide and has the afternoon free.",
                "The user is studying the topic for an exam next week.",
                "The user is teaching the topic to a class tomorrow.",
                "The user has a long train ride and wants something to read.",
                "The user is writing a manual for new staff.",
                "The user is preparing a report that must cover everything."]),
    "formality": ("formal", "casual",
                  ["The user wants a formal, professional tone.", "Answer in a polite, formal register.",
                   "The user dislikes slang.", "Write as you would to a client.",
                   "The user expects a courteous, professional reply.",
                   "The user prefers impersonal, businesslike language."],
                  ["The user wants a relaxed, friendly tone.", "Answer casually, like a friend would.",
                   "The user finds stiff language off-putting.", "Talk to the user like a buddy.",
                   "The user wants a laid-back reply.", "The user prefers chatty, informal language."],
                  ["The answer will be pasted into a letter to the board of directors.",
                   "The user is writing to a government office.", "The answer goes into an official complaint letter.",
                   "The user is emailing a senior manager.", "The text is part of a legal notice to tenants.",
                   "The text goes into a company handbook."],
                  ["The user is texting with a close friend.", "The answer is for a group chat with old friends.",
                   "The user is messaging a sibling.", "The user is posting in a casual forum among friends.",
                   "The user is chatting with a neighbour over the fence.", "The user is chatting with a roommate."]),
    "format": ("list", "prose",
               ["The user wants the answer as a bulleted list.", "Give the points as a list, one per line.",
                "The user dislikes long paragraphs.", "Break the answer into separate points.",
                "The user wants items they can scan.", "The user prefers lists to paragraphs."],
               ["The user wants flowing paragraphs, not lists.", "Answer in running prose.",
                "The user does not want a list.", "Write it as connected sentences.", "The user finds lists choppy.",
                "The user dislikes bullet points."],
               ["The user will print the answer as a checklist for the fridge.",
                "The user wants to tick the steps off one by one.",
                "The answer becomes a checklist for a packing trip.",
                "The user wants points to copy onto a whiteboard.", "The steps go onto a printed card, one per line.",
                "The answer goes on a slide."],
               ["The answer will be read aloud on a radio show.", "The user is writing an essay.",
                "The answer is part of a letter to a pen friend.",
                "The text becomes a paragraph in a magazine article.",
                "The user will narrate the answer in a podcast.", "The text goes into a short story."]),
    "tone": ("cautious", "direct",
             ["The user wants caveats and a careful, hedged answer.", "Mention uncertainty and exceptions.",
              "The user wants to hear what could go wrong.", "Add warnings where they apply.",
              "The user dislikes overconfident advice.", "The user prefers cautious advice."],
             ["The user wants a direct answer without hedging.", "Just say what to do, no caveats.",
              "The user dislikes disclaimers.", "Give plain commands without warnings.",
              "The user wants the advice stated with certainty.", "The user prefers confident, plain instructions."],
             ["The user is a careful beginner worried about getting it wrong.",
              "The user has had bad results following advice before.",
              "The user is new to this and afraid of breaking something.",
              "The user once ruined something by following bad tips.",
              "The user double-checks everything before acting.", "The user is anxious about mistakes."],
             ["The user is an expert who only needs the steps.", "The user is impatient with disclaimers.",
              "The user is a professional who does this daily.",
              "The user is in a rush and wants only the instructions.", "The user teaches this skill to others.",
              "The user has done this many times and wants a reminder."]),
    "example": ("with an example", "without an example",
                ["The user wants a concrete example.", "Include an example to illustrate.",
                 "The user learns best from examples."],
                ["The user wants the general advice only, no examples.", "Leave out examples.",
                 "The user finds examples distracting."],
                ["The user is a beginner who has never done this.", "The user is a child learning the topic.",
                 "The user asked for something to copy."],
                ["The user is making a very short summary card.", "The text must fit in a tweet-length note.",
                 "The user only needs the principles for a slide title."]),
    "register": ("technical", "plain",
                 ["The user wants precise, technical wording.", "Use the vocabulary of a specialist.",
                  "The user prefers exact technical terms."],
                 ["The user wants plain everyday words.", "Avoid jargon entirely.",
                  "The user prefers simple language."],
                 ["The answer is for a professional journal.", "The reader is a specialist in the field.",
                  "The user is an engineer writing documentation."],
                 ["The answer is for a ten-year-old.", "The reader is new to the subject.",
                  "The user will read it to a grandparent."]),
    "warmth": ("encouraging", "neutral",
               ["The user wants warm encouragement.", "Be upbeat and supportive.",
                "The user needs a confidence boost.", "Cheer the user on.",
                "The user wants a friendly, positive push.", "The user likes a cheerful, motivating answer."],
               ["The user wants a neutral answer without a pep talk.", "Skip the encouragement, stay matter-of-fact.",
                "The user dislikes motivational talk.", "Give the facts without praise.",
                "The user wants a dry, factual reply.", "The user finds cheerleading annoying."],
               ["The user has failed at this twice and feels discouraged.",
                "The user is nervous about trying this for the first time.",
                "The user had a rough week and feels down.", "The user doubts they can manage this.",
                "The user is a student who keeps failing at this.", "The user says they are close to giving up."],
               ["The answer goes into a reference manual.", "The user is compiling facts for an encyclopedia entry.",
                "The text goes into a product specification.", "The answer is stored in a database of facts.",
                "The user is writing an entry in a technical glossary.",
                "The text will be used in a dry technical FAQ."]),
    "humour": ("humorous", "serious",
               ["The user wants a bit of humour.", "Add a light joke.", "Make the user smile.",
                "The user wants a witty reply.", "A little fun is welcome.", "The user enjoys playful answers."],
               ["The user wants a strictly serious answer.", "No jokes, please.", "Keep humour out of it.",
                "The user wants a grave, straight answer.", "The user finds jokes unprofessional.",
                "The user prefers a sober tone."],
               ["The answer will be read out at a light-hearted office party.",
                "The user is writing a funny newsletter.", "The answer is for a comedy blog.",
                "The user is writing a funny birthday card.", "The user wants to cheer up a bored friend.",
                "The user wants to make a friend laugh."],
               ["The answer goes into an official safety notice.", "The user is preparing a formal training document.",
                "The text goes into a hospital leaflet.", "The answer is for a condolence note.",
                "The user is preparing an official government report.", "The text will be read at a solemn meeting."]),
    "question": ("with a follow-up question", "without a question",
                 ["The user wants the answer to end with a follow-up question.",
                  "Ask the user something back at the end.", "End by asking the user a question.",
                  "The user wants to be asked if they need more.", "Invite the user to reply.",
                  "The user likes it when the assistant checks what else they need."],
                 ["The user wants no questions back.", "Do not ask anything in return.",
                  "The user dislikes being asked questions.", "End with a statement, not a question.",
                  "The user wants the reply to close the topic.", "The user wants a final answer, not a conversation."],
                 ["The user wants to keep chatting about the topic.",
                  "The user is unsure what they need and wants to be guided.", "The user wants an ongoing dialogue.",
                  "The assistant is tutoring the user step by step.",
                  "The user is exploring the topic and open to suggestions.",
                  "The assistant is running a coaching session."],
                 ["The user cannot reply after this message.", "The answer is printed on a poster.",
                  "The answer is engraved on a plaque.", "The user goes offline right after reading this.",
                  "The text goes into a printed leaflet.", "The message is sent as a one-way notification."]),
    "emoji": ("with emoji", "without emoji",
              ["The user likes emoji in answers.", "Decorate the answer with emoji.", "Add some emoji to the answer.",
               "The user enjoys smileys and icons.", "Sprinkle in a couple of emoji.",
               "The user wants a few playful symbols."],
              ["The user wants no emoji.", "Plain words only, no emoji.", "Do not add any emoji.",
               "The user finds emoji childish.", "Use no icons or smileys.", "The user dislikes emoji."],
              ["The answer is for a teenager's social media post.", "The user is sending it in a fun group chat.",
               "The text is for a fun chat with a cousin.", "The answer is a cheerful message to a kid.",
               "The user is writing a playful caption for a photo.", "The text goes on a colourful sticker."],
              ["The answer will be printed in a newspaper.", "The text goes into a legal document.",
               "The answer goes into a scientific paper.", "The text is printed on an official form.",
               "The user is writing to a court.", "The answer is read aloud by a screen reader for a blind user."]),
    "heading": ("with a heading", "without a heading",
                ["The user wants a heading above the answer.", "Start with a title line.", "Give the answer a title.",
                 "Put a headline on top.", "The user wants the answer to start with a heading line.",
                 "The user prefers answers with a header."],
                ["The user wants no heading, just the answer.", "Skip the title.", "Do not add a title.",
                 "The user wants the answer to begin directly.", "No headline above the text.",
                 "The user dislikes headers in short answers."],
                ["The answer becomes a section of a wiki page.",
                 "The user is assembling a document with many sections.",
                 "The answer becomes a chapter in a handbook.", "The text is a page on a documentation site.",
                 "The user is building a structured report with titled parts.",
                 "The text goes into a table of contents."],
                ["The answer is a quick text message.", "The answer is spoken by a voice assistant.",
                 "The answer is a reply in a chat window.", "The text is whispered into a headset.",
                 "The answer is read out over the phone.", "The user pastes it into a one-line chat reply."]),
    "bold": ("with bold key words", "plain text",
             ["The user wants the key words in bold.", "Highlight the most important part in bold.",
              "Make the key phrase bold.", "Use bold for the main idea.",
              "The user wants important words to stand out.", "The user likes emphasis on the main point."],
             ["The user wants plain text with no Markdown.", "Do not use bold or any formatting.",
              "Avoid Markdown formatting.", "The user wants unformatted text.", "No asterisks or bold, please.",
              "The user's screen shows asterisks literally."],
             ["The answer is shown in a Markdown viewer for skimming.",
              "The user skims answers for the highlighted part.",
              "The answer is shown on a forum that renders Markdown.",
              "The user wants to spot the main point at a glance.", "The text goes into a formatted study guide.",
              "The text goes on a web page with rich formatting."],
             ["The answer is sent as an SMS.", "The text will be typed into a plain-text form.",
              "The text goes into a plain email client.", "The answer is printed by a receipt printer.",
              "The answer is pasted into a spreadsheet cell.",
              "The answer goes into a terminal that shows raw characters."]),
    "numbering": ("numbered steps", "bullet points",
                  ["The user wants numbered steps.", "Number each point.", "Give each step a number.",
                   "The user wants an ordered, numbered list.", "Put a number before each point.",
                   "The user prefers 1, 2, 3 over bullets."],
                  ["The user wants bullet points, not numbers.", "Use dashes, not numbers.",
                   "Do not number the points.", "Use bullets, not a numbered list.",
                   "The user wants plain dashes before each point.", "The user prefers unnumbered bullets."],
                  ["The user will refer to the steps by number on a phone call.", "The steps must be done in order.",
                   "The user follows along and must track which step they are on.",
                   "The steps are read aloud in a fixed sequence.",
                   "The user will say 'I am at step two' to a helper.", "The user will cite step numbers in a report."],
                  ["The order of the points does not matter to the user.", "The points go on a slide of loose ideas.",
                   "The points are a loose collection of tips.", "The points can be done in any order.",
                   "The user will sort the tips by their own priority later.",
                   "The user will shuffle the points into a mind map."]),
    "summary": ("with a summary line", "without a summary",
                ["The user wants a one-line summary at the end.", "Finish with a short recap.",
                 "End with a one-sentence wrap-up.", "Sum the answer up at the end.",
                 "The user wants the key point repeated at the end.", "The user likes a closing summary."],
                ["The user wants no recap at the end.", "Do not repeat yourself in a summary.",
                 "Stop after the last point.", "No wrap-up sentence.", "The user wants no repetition at the end.",
                 "The user finds closing summaries redundant."],
                ["The user will only read the last line.", "The user is skimming many answers quickly.",
                 "The user forgets things and wants the gist restated.",
                 "The user skims to the bottom for the takeaway.",
                 "The answer goes into a briefing where each item ends with a takeaway.",
                 "The user will copy the final line into a to-do app."],
                ["The user reads every word and hates repetition.", "The text has a strict word limit.",
                 "Every word costs money in this telegram.", "The user is annoyed by repeated information.",
                 "The text must fit a tiny space on a label.", "The answer is one entry in a tightly edited booklet."]),
}
TEST_DIMENSIONS = ("register", "example")
IRRELEVANT = ["The user likes the colour blue.", "It is raining in Lisbon today.", "The user owns two cats.",
              "Purple elephants compute the tide.", "The user was born on a Tuesday."]
COLUMNS = ("prompt", "response_a", "response_b", "criteria_x", "criteria_y", "scenario_x", "scenario_y")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _parts(prompt: str, facts: list[str], example: str) -> dict:
    first = _cap(facts[0])
    rest = ", ".join(facts[1:-1] + [f"and {facts[-1]}"]) if len(facts) > 2 else facts[-1]
    return {"prompt": prompt, "facts": facts, "example": example, "first": first, "rest": rest,
            "neutral": f"{first}, {rest}."}


def _bullets(v: dict) -> str:
    return "\n".join(f"- {_cap(f)}" for f in v["facts"])


def _neutral(v: dict) -> str:
    return v["neutral"]


# style: its response from the prompt's parts (first fact capitalised, the rest joined, the neutral sentence)
STYLES = {
    "concise": lambda v: f"{v['first']}.",
    "detailed": lambda v: (f"{v['first']}; this matters more than anything else. " + " ".join(
        f"Next, {f}, which makes a real difference over time." for f in v["facts"][1:]) +
        " Taken together, these steps cover the usual problems."),
    "formal": lambda v: (f"It is advisable to {v['facts'][0]}. One should also "
                         f"{'; one should also '.join(v['facts'][1:])}."),
    "casual": lambda v: f"Honestly? Just {v['facts'][0]}, and hey, {' and '.join(v['facts'][1:])} too. Easy!",
    "list": _bullets,
    "cautious": lambda v: (f"It may help to {v['facts'][0]}, though results vary. You might also "
                           f"{' and '.join(v['facts'][1:])}; check what suits your situation first."),
    "direct": lambda v: " ".join(f"{_cap(f)}." for f in v["facts"]),
    "with an example": lambda v: f"{v['neutral']} For example: {v['example']}.",
    "technical": lambda v: (f"Procedure: (1) {v['facts'][0]}; (2) {'; (3) '.join(v['facts'][1:])}. "
                            "Deviations degrade the outcome."),
    "plain": lambda v: f"Here is the easy way. {v['neutral']} That's all.",
    "encouraging": lambda v: (f"Great question, and you can absolutely do this! {v['neutral']} You will get the "
                              "hang of it in no time."),
    "humorous": lambda v: f"{v['neutral']} Your future self will thank you, probably with snacks.",
    "with a follow-up question": lambda v: f"{v['neutral']} Would you like more detail on any of these?",
    "with emoji": lambda v: f"{v['first']} 👍 {v['rest']}. ✨",
    "with a heading": lambda v: f"## {v['prompt'].rstrip('?')}\n{v['neutral']}",
    "with bold key words": lambda v: f"**{v['first']}**, {v['rest']}.",
    "numbered steps": lambda v: "\n".join(f"{k}. {_cap(f)}" for k, f in enumerate(v["facts"], 1)),
    "with a summary line": lambda v: f"{v['neutral']} In short: {v['facts'][0]}.",
    "bullet points": _bullets,
    **{s: _neutral for s in ("prose", "without an example", "neutral", "serious", "without a question",
                             "without emoji", "without a heading", "plain text", "without a summary")},
}


def render(prompt: str, facts: list[str], example: str, style: str) -> str:
    """One response to `prompt` in `style` (the other dimensions neutral)."""
    if style not in STYLES:
        raise InfinictxError(f"unknown style {style!r}")
    return STYLES[style](_parts(prompt, facts, example))


@dataclass
class PreferenceSet:
    train: list[dict]
    test: list[dict]
    adversarial: list[dict]
    relevance: list[dict]   # training pairs the prompt decides whatever the context asks (see build_reversal_set)


def build_reversal_set(seed: int = 0) -> PreferenceSet:
    """Every topic × dimension as a reversal pair (response order shuffled, contexts matched to it); training rows
    use two of the training phrasings per topic of the training dimensions, test rows the held-out (last) phrasing
    of every training dimension and every phrasing of the held-out dimensions."""
    rng = random.Random(seed)
    train, test = [], []
    for dim, (sa, sb, crit_a, crit_b, scen_a, scen_b) in DIMENSIONS.items():
        n = len(crit_a)
        for t, (prompt, facts, example) in enumerate(TOPICS):
            # (phrasing, split): a held-out dimension is test only; the others keep their last phrasing for the
            # test and give each topic two of the others, in turn, so every training phrasing is used equally
            plan = ([(k, "test") for k in range(n)] if dim in TEST_DIMENSIONS else
                    [((2 * t) % (n - 1), "train"), ((2 * t + 1) % (n - 1), "train"), (n - 1, "test")])
            a, b = render(prompt, facts, example, sa), render(prompt, facts, example, sb)
            for k, split in plan:
                swap = rng.random() < 0.5   # which style is response_a
                (test if split == "test" else train).append({
                    "prompt": prompt, "response_a": b if swap else a, "response_b": a if swap else b,
                    "criteria_x": crit_b[k] if swap else crit_a[k], "criteria_y": crit_a[k] if swap else crit_b[k],
                    "scenario_x": scen_b[k] if swap else scen_a[k], "scenario_y": scen_a[k] if swap else scen_b[k],
                    "dimension": dim, "split": split})
    # Relevance pairs for training: an answer to the prompt in the style the context argues against, against an
    # answer to another prompt in the style the context asks for. Reversal pairs alone teach a fresh score head
    # that style is all there is (it then prefers an off-topic answer in the asked style); the adversarial test
    # pairs below use other topic pairings and contexts no training row has.
    relevance = []
    train_dims = [d for d in DIMENSIONS if d not in TEST_DIMENSIONS]
    for k, (prompt, facts, example) in enumerate(TOPICS):
        other = TOPICS[(k + 3) % len(TOPICS)]
        for dim in train_dims:
            sa, sb, crit_a, crit_b, scen_a, scen_b = DIMENSIONS[dim]
            # one of the two phrasings this topic's reversal pairs of the dimension use
            phrasing = (2 * k + rng.randrange(2)) % (len(crit_a) - 1)
            wants_a = rng.random() < 0.5
            asked, against = (sa, sb) if wants_a else (sb, sa)
            relevance.append({"prompt": prompt, "chosen": render(prompt, facts, example, against),
                              "rejected": render(other[0], other[1], other[2], asked),
                              "criteria": (crit_a if wants_a else crit_b)[phrasing],
                              "scenario": (scen_a if wants_a else scen_b)[phrasing], "dimension": dim})
    adversarial = []
    for k, (prompt, facts, example) in enumerate(TOPICS):
        other = TOPICS[(k + 7) % len(TOPICS)]
        good = render(prompt, facts, example, "prose")
        bad = render(other[0], other[1], other[2], "prose")   # answers another question
        for ctx in IRRELEVANT:
            swap = rng.random() < 0.5
            adversarial.append({"prompt": prompt, "response_a": bad if swap else good,
                                "response_b": good if swap else bad, "context": ctx, "label": "b" if swap else "a"})
    return PreferenceSet(train, test, adversarial, relevance)


def read_rpr(path: str | Path) -> list[dict]:
    """Rows of the real RPR layout (CSV, JSONL or parquet) with the columns in `COLUMNS`."""
    path = Path(path)
    if not path.exists():
        raise InfinictxError(f"{path} does not exist")
    if path.suffix == ".jsonl":
        from .texts import jsonl_rows

        rows = [obj for _, obj in jsonl_rows(path)]
    elif path.suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise InfinictxError(f"RPR data must be .csv, .jsonl or .parquet, not {path.suffix or 'no suffix'}")
    if not rows:
        raise InfinictxError(f"{path} has no rows")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise InfinictxError(f"{path} lacks the RPR column(s) {', '.join(missing)}")
    for k, r in enumerate(rows):
        empty = [c for c in COLUMNS if not isinstance(r.get(c), str) or not r[c].strip()]
        if empty:
            raise InfinictxError(f"{path}: row {k + 1} has an empty {empty[0]}")
    return rows
