"""Preference pairs whose preference a context reverses (the shape of RPR, arXiv 2407.14916), built offline.

Each pair is one prompt with two responses that carry the same content in two styles along one dimension
(concise vs detailed, formal vs casual, list vs prose, cautious vs direct, with vs without an example,
technical vs plain, and eight more in `DIMENSIONS`), so neither is better without a context. Two contexts
reverse the preference: under the `x` contexts response_a is preferred, under the `y` contexts response_b — as
stated criteria ("The user wants the short answer.") and as scenarios the criterion must be inferred from ("The
user is reading on a phone between meetings."). The columns are RPR's: prompt, response_a, response_b,
criteria_x, criteria_y, scenario_x, scenario_y, plus `dimension` and `split`.

Held out for testing: whole dimensions (`TEST_DIMENSIONS`) and, for the other dimensions, the last phrasing of each
context list. Training rows also use composed criteria — what the user wants, refuses, or prefers to what, and
commands (`CRITERIA_PHRASES` in `CRITERIA_TEMPLATES`; none close to a held-out phrasing, `near_held_out`) — and
more scenarios (`MORE_SCENARIOS`). Adversarial rows: a response that does not answer the prompt against one that
does, with an irrelevant or nonsense context: the prompt alone decides them (`label` says which response is right
under every context).
Relevance rows (training only): an on-topic answer in the style the context argues against beats an off-topic one
in the style it asks for; they teach that a context weighs only between answers that both answer the prompt.

`read_rpr` loads the real RPR layout from a CSV / JSONL / parquet for users who have it."""

from __future__ import annotations

import functools
import random
import re
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

# More training contexts for the training dimensions (never for the held-out ones, never a held-out phrasing):
# with six hand-written phrasings, the 3-epoch model fit its training rows exactly and still judged some held-out
# phrasings at or below chance (heading 0.21 under criteria, length 0.25 under scenarios): it had learnt the five
# training sentences, not what they say. Criteria are therefore also composed: what the user wants, said of either
# side — "{subject} wants <a phrase for style a>" and "{subject} dislikes <a phrase for style b>" both ask for a —
# so a negation is learnt as a reversal of the thing negated, not as a keyword. Scenarios cannot be composed that
# way (the criterion must be inferred), so each side gets four more, written by hand.
CRITERIA_PHRASES = {   # dimension: (phrases naming style a, phrases naming style b)
    "length": (["a short answer", "a brief reply", "just the gist", "the quick version", "a compact answer",
                "a one-liner"],
               ["a thorough answer", "a detailed explanation", "every step spelled out", "an in-depth answer",
                "the full explanation", "all the details"]),
    "formality": (["a formal tone", "a professional, polite reply", "a courteous register",
                   "the tone of an official letter"],
                  ["a casual tone", "a relaxed, friendly reply", "an informal register",
                   "the tone of a text between friends"]),
    "format": (["a bulleted list", "one point per line", "a list of separate items", "a list to scan",
                "points instead of paragraphs"],
               ["flowing paragraphs", "running prose", "connected sentences", "a paragraph of text",
                "an answer written as prose"]),
    "tone": (["caveats and warnings", "a careful, hedged answer", "a mention of what could go wrong",
              "careful advice", "the risks spelled out"],
             ["a direct answer", "instructions without hedging", "confident advice", "the steps with no caveats",
              "a straight answer"]),
    "warmth": (["warm encouragement", "an upbeat, supportive reply", "a confidence boost", "a motivating answer",
                "some cheering on"],
               ["a neutral, factual reply", "just the facts", "a matter-of-fact answer", "a dry, sober reply",
                "a plain factual statement"]),
    "humour": (["a bit of humour", "a light joke", "a witty reply", "a playful answer", "something to smile at"],
               ["a serious answer", "a straight, sober reply", "a grave tone", "a strictly serious tone",
                "a no-nonsense reply"]),
    "question": (["a follow-up question at the end", "a question back", "an invitation to reply",
                  "an offer of more help", "an answer that ends by asking something"],
                 ["an answer that ends with a statement", "a final, closed answer", "a reply that closes the topic",
                  "a one-way answer", "an answer with nothing asked back"]),
    "emoji": (["emoji", "some smileys", "little icons", "emoji in the text", "a couple of emoji"],
              ["words only", "text without emoji", "a plain, emoji-free answer", "words and no icons",
               "unadorned text"]),
    "heading": (["a heading above the answer", "a title line", "a headline on top", "a title before the text",
                 "an answer that opens with a heading"],
                ["just the answer, no title", "an answer that begins directly", "text without a title",
                 "the answer straight away", "an untitled answer"]),
    "bold": (["the key words in bold", "bold for the main idea", "the key idea highlighted",
              "key terms that stand out", "emphasis in bold"],
             ["plain text with no Markdown", "unformatted text", "raw text without asterisks",
              "text free of formatting", "an answer with no bold"]),
    "numbering": (["numbered steps", "an ordered, numbered list", "a number before each point",
                   "steps labelled 1, 2, 3", "a numbered list"],
                  ["a list marked with dashes", "dashes before each point", "an unnumbered list", "plain bullets",
                   "a list without numbers"]),
    "summary": (["a one-line summary at the end", "a short recap", "a closing wrap-up",
                 "the key point repeated at the end", "a last line that sums it up"],
                ["an answer that stops after the last point", "an answer without a wrap-up",
                 "an ending with no repetition", "an answer that ends without restating anything",
                 "no recap at the end"]),
}
SUBJECTS = ["The user", "The reader", "This user", "The person asking", "The customer"]
# templates over {s} (a subject), {want} (a phrase for the style asked for) and {avoid} (one for the other style).
# The first composed set had only "wants" and "refuses" sentences, each naming one style; the model then judged
# held-out criteria that name both styles ("prefers lists to paragraphs", "prefers unnumbered bullets") as if the
# style named were wanted (at chance under both contexts). Comparatives name both styles in either order, so the
# word order and the verb, not the presence of a style word, decide; commands have no subject at all.
CRITERIA_TEMPLATES = {
    "wants": ["{s} wants {want}.", "{s} would like {want}.", "{s} asked for {want}.", "{s} is hoping for {want}.",
              "{s} prefers {want}.", "{s} is looking for {want}.", "{s} likes {want}.", "{s} needs {want}.",
              "{s} values {want}.", "{s} expects {want}."],
    "refuses": ["{s} does not want {avoid}.", "{s} dislikes {avoid}.", "{s} would rather not get {avoid}.",
                "{s} has no use for {avoid}.", "{s} is tired of {avoid}.", "{s} avoids {avoid}.",
                "{s} cannot stand {avoid}."],
    "compares": ["{s} prefers {want} to {avoid}.", "{s} wants {want} rather than {avoid}.",
                 "{s} wants {want}, not {avoid}.", "{s} would take {want} over {avoid}.",
                 "Instead of {avoid}, {s_mid} wants {want}.", "{s} dislikes {avoid} and wants {want}.",
                 "Rather than {avoid}, {s_mid} would like {want}."],
    "commands": ["Give {want}.", "Reply with {want}.", "Please write {want}.", "Avoid {avoid}.",
                 "Do not give {avoid}.", "Give {want}, not {avoid}.", "Skip {avoid} and give {want}."],
}
MORE_SCENARIOS = {   # dimension: (four scenarios for style a, four for style b)
    "length": (["The user checks the answer at a red traffic light.",
                "The user is about to board a plane and has a minute.",
                "The answer appears as a phone notification.", "The user reads it in the queue at the supermarket."],
               ["The user is writing a thesis chapter on the topic.",
                "The user is training new colleagues on every case.",
                "The user has a quiet evening to learn the subject properly.", "The user is building a course on it."]),
    "formality": (["The text goes into a cover letter for a job.", "The user is writing to the bank about a loan.",
                   "The answer is quoted in a press release.", "The user is replying to a university dean."],
                  ["The user is chatting with a cousin at a barbecue.", "The answer is a voice note to a best friend.",
                   "The user is writing in a family group chat.",
                   "The user is joking around with teammates after practice."]),
    "format": (["The user will stick the steps on a note by the door.", "The answer becomes a to-do list in an app.",
                "The user wants to check items off while shopping.", "The points go onto a shopping list."],
               ["The answer is told as a bedtime story.", "The text becomes part of a personal letter.",
                "The answer is spoken in a phone conversation.", "The text goes into the narration of a novel."]),
    "tone": (["The user is trying this for the first time on an expensive item.",
              "The user's last attempt went badly wrong.", "The user is nervous and wants to avoid any risk.",
              "The user is doing this for an elderly parent and is worried."],
             ["The user has years of experience and wants only the steps.",
              "The user is a tradesperson on a busy job.", "The user is short on time and knows the risks already.",
              "The user is an instructor checking the procedure."]),
    "warmth": (["The user just got a poor grade and feels low.", "The user is scared to try this again.",
                "The user lost confidence after a setback.", "The user feels out of their depth."],
               ["The text goes into a scientific data sheet.", "The answer is filed in a legal record.",
                "The user is writing a dictionary definition.", "The answer goes into an inventory log."]),
    "humour": (["The answer is for a stand-up comedy set.", "The user is writing a jokey toast for a wedding.",
                "The text goes on a funny greeting card.", "The user wants to lighten the mood at a picnic."],
               ["The answer is for a funeral programme.", "The text goes into an accident report.",
                "The answer is part of a court statement.", "The user is writing a formal apology to a client."]),
    "question": (["The assistant is helping the user decide over several messages.",
                  "The user wants a back-and-forth conversation.",
                  "The user is brainstorming and wants prompts to keep going.",
                  "The assistant is interviewing the user to learn more."],
                 ["The answer is printed on a receipt.", "The text is a recorded announcement.",
                  "The message goes out as an automated newsletter.", "The user closes the app right after reading."]),
    "emoji": (["The text is a playful message to a young niece.", "The answer is for a cheerful party invitation.",
               "The user is replying in a fun chat with classmates.", "The text goes on a birthday banner for kids."],
              ["The answer goes into a formal contract.", "The text appears in an academic textbook.",
               "The answer is part of an official letter to the tax office.",
               "The text is read by a text-to-speech system."]),
    "heading": (["The answer becomes an entry in a printed manual with sections.",
                 "The text is one section of a long tutorial.", "The answer is a chapter page in an online course.",
                 "The user is laying out a report with a title for each part."],
                ["The answer is a short reply in a text thread.", "The answer is spoken aloud in a car.",
                 "The user reads the answer in a quick chat on the phone.", "The answer is a short voicemail."]),
    "bold": (["The answer appears in a rendered Markdown note.", "The user scans notes for highlighted terms.",
              "The text goes into a study sheet with emphasis.",
              "The answer is shown in a chat app that renders bold."],
             ["The text is sent through a pager.", "The answer goes into a plain-text log file.",
              "The text is typed into a form that shows symbols as they are.",
              "The answer is printed on a ticket by a simple printer."]),
    "numbering": (["The user will follow the steps in order on a call with support.",
                   "The helper will ask which step the user reached.",
                   "The steps are for an assembly that must go in sequence.",
                   "The user will refer back to step three later."],
                  ["The tips can be tried in any order.", "The points are loose ideas for a brainstorm.",
                   "The user will pick whichever tips appeal.", "The order of the items is irrelevant."]),
    "summary": (["The user only has time for the final takeaway.",
                 "The user wants the gist restated to remember it.",
                 "The answer goes into a newsletter where each item ends with a key line.",
                 "The user reads the end first."],
                ["Space is tight: the text has a hard character limit.", "The user hates reading the same thing twice.",
                 "The answer is printed on a tiny sticker.", "The editor cuts every redundant sentence."]),
}
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


# words that frame a context rather than carry its meaning ("The user is ...", "The answer goes into ...")
_FRAME_WORDS = set("the a an of to and in with is it be for on at this that their they as by or are its one answer "
                   "text go goe into will want ha wa who read reader person asking customer through about after "
                   "before from do done never has was been user".split())


def _content_words(text: str) -> set[str]:
    words = re.findall(r"[a-z]+", text.lower())
    words = {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "is", "us")) else w for w in words}
    return words - _FRAME_WORDS


def held_out_contexts() -> list[str]:
    """Every context a test row may use: the last phrasing of each list of a training dimension, and every phrasing
    of a held-out dimension."""
    return [c for dim, (_, _, *lists) in DIMENSIONS.items() for p in lists
            for c in (p if dim in TEST_DIMENSIONS else p[-1:])]


def near_held_out(context: str) -> bool:
    """Whether `context` is a held-out context or shares two or more content words with one ("The customer prefers
    a detailed explanation" with "The user prefers long, detailed answers"): such a context would make a held-out
    phrasing a paraphrase of a training one, so composed training contexts never include it."""
    words = _content_words(context)
    return any(context == h or len(words & held) >= 2 for h, held in _held_out_words())


@functools.cache
def _held_out_words() -> tuple[tuple[str, set[str]], ...]:
    return tuple((h, _content_words(h)) for h in held_out_contexts())


@functools.cache
def composed_by_family(dim: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """{template family: (criteria asking for style a, for style b)} composed from `CRITERIA_PHRASES` with
    `CRITERIA_TEMPLATES`, near-held-out ones left out."""
    phrases_a, phrases_b = CRITERIA_PHRASES[dim]
    out = {}
    for family, templates in CRITERIA_TEMPLATES.items():
        sides = []
        for mine, other in ((phrases_a, phrases_b), (phrases_b, phrases_a)):
            composed = {t.format(s=s, s_mid=s[0].lower() + s[1:], want=w, avoid=v)
                        for t in templates for s in SUBJECTS for w in mine for v in other
                        if not v.startswith("no ") or "{avoid}" not in t}   # "avoids no recap": a double negative
            sides.append(tuple(sorted(c for c in composed if not near_held_out(c))))
        out[family] = (sides[0], sides[1])
    return out


def composed_criteria(dim: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(criteria asking for style a, for style b): every family of `composed_by_family` together."""
    families = composed_by_family(dim).values()
    return tuple(c for a, _ in families for c in a), tuple(c for _, b in families for c in b)


def build_reversal_set(seed: int = 0) -> PreferenceSet:
    """Every topic × dimension as a reversal pair (response order shuffled, contexts matched to it). A training
    dimension gives each topic two training rows — one with a hand-written phrasing (in turn, so each is used
    equally), one with a composed criterion and one of `MORE_SCENARIOS` — and a test row with the held-out (last)
    phrasing; a held-out dimension gives each topic a test row per phrasing."""
    rng = random.Random(seed)
    compose_rng = random.Random(seed + 1)   # its own stream: the test rows and their order stay those of `rng`
    train, test = [], []
    contexts = {}   # (dimension, topic): the (criteria a, criteria b, scenario a, scenario b) of its training rows
    for dim, (sa, sb, crit_a, crit_b, scen_a, scen_b) in DIMENSIONS.items():
        n = len(crit_a)
        for t, (prompt, facts, example) in enumerate(TOPICS):
            if dim in TEST_DIMENSIONS:
                plan = [(crit_a[k], crit_b[k], scen_a[k], scen_b[k], "test") for k in range(n)]
            else:
                more_a, more_b = MORE_SCENARIOS[dim]
                families = composed_by_family(dim)

                def composed(side: int) -> str:   # a family first: the comparatives, with both phrases free,
                    # outnumber the rest many times over
                    return compose_rng.choice(families[compose_rng.choice(list(families))][side])

                k = t % (n - 1)
                plan = [(crit_a[k], crit_b[k], scen_a[k], scen_b[k], "train"),
                        (composed(0), composed(1), more_a[t % len(more_a)], more_b[t % len(more_b)], "train"),
                        (crit_a[-1], crit_b[-1], scen_a[-1], scen_b[-1], "test")]
                contexts[dim, t] = [p[:4] for p in plan[:2]]
            a, b = render(prompt, facts, example, sa), render(prompt, facts, example, sb)
            for ca, cb, xa, xb, split in plan:
                swap = rng.random() < 0.5   # which style is response_a
                (test if split == "test" else train).append({
                    "prompt": prompt, "response_a": b if swap else a, "response_b": a if swap else b,
                    "criteria_x": cb if swap else ca, "criteria_y": ca if swap else cb,
                    "scenario_x": xb if swap else xa, "scenario_y": xa if swap else xb,
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
            sa, sb = DIMENSIONS[dim][:2]
            ca, cb, xa, xb = contexts[dim, k][rng.randrange(2)]   # the contexts of one of its training rows
            wants_a = rng.random() < 0.5
            asked, against = (sa, sb) if wants_a else (sb, sa)
            relevance.append({"prompt": prompt, "chosen": render(prompt, facts, example, against),
                              "rejected": render(other[0], other[1], other[2], asked),
                              "criteria": ca if wants_a else cb, "scenario": xa if wants_a else xb,
                              "dimension": dim})
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
