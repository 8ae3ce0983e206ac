"""The words task-api requests are made of: tasks, dates, priorities, labels, filler.

Every list here is data, not logic; ``generate.py`` draws from them with a seeded RNG. Some task
objects mention a day or a month ("the Friday team lunch") without being a due date: they teach
the model that a date word is not always a due date.
"""

from __future__ import annotations

# verb -> objects; a task's title is "Verb object" (the request says "verb object").
TASKS: dict[str, list[str]] = {
    "call": ["the dentist", "mom", "dad", "the plumber", "the bank", "grandma", "the landlord",
             "the vet", "the insurance company", "Dr. Patel", "the school office", "my sister"],
    "email": ["Sarah about the budget report", "the landlord about the leak", "Tom the meeting notes",
              "the team about the Friday offsite", "Professor Kim about the deadline", "HR about my vacation days"],
    "buy": ["milk", "eggs and bread", "a birthday card for Anna", "printer ink", "dog food",
            "new running shoes", "batteries", "a gift for mom", "coffee beans", "light bulbs", "a Monday planner"],
    "pick up": ["the dry cleaning", "the kids from school", "my prescription", "the package at the post office",
                "Jake from the airport", "the cake for the party"],
    "book": ["a dentist appointment", "a table at Luigi's", "flights to Denver", "a haircut",
             "a hotel for the conference", "the car service", "tickets for the March concert"],
    "pay": ["the electricity bill", "rent", "the credit card bill", "the water bill", "the parking ticket",
            "Mike back for lunch"],
    "renew": ["my passport", "the car insurance", "the gym membership", "my library books", "the domain name",
              "my driver's license"],
    "schedule": ["a call with the accountant", "the team retro", "an oil change", "a vet checkup for Max",
                 "the 1:1 with Priya", "a meeting about the Tuesday launch"],
    "send": ["the invoice to Acme", "a thank-you note to grandma", "the slides to Maria", "the signed lease back",
             "photos to dad", "the weekly update"],
    "clean": ["the garage", "the fridge", "the bathroom", "out the closet", "the gutters", "the windows"],
    "water": ["the plants", "the garden", "the tomatoes"],
    "review": ["the pull request from Ana", "the Q3 budget", "the contract draft", "Leo's essay",
               "the weekend schedule"],
    "submit": ["the expense report", "the tax return", "the grant application", "my timesheet"],
    "return": ["the library books", "the blue jacket", "Sam's drill", "the rental car"],
    "fix": ["the leaky faucet", "the squeaky door", "the bike tire", "the login bug", "the fence"],
    "cancel": ["the Netflix subscription", "the hotel reservation", "the newspaper delivery"],
    "prepare": ["the slides for the Monday meeting", "dinner for the guests", "the quarterly report",
                "questions for the interview"],
    "text": ["Jenna about the weekend trip", "the babysitter", "Carlos happy birthday", "Ben the address"],
    "plan": ["the Friday team lunch", "mom's birthday party", "the trip to Lisbon", "meals for the week"],
    "order": ["more printer paper", "a new phone case", "groceries online", "a replacement charger"],
    "take": ["out the trash", "the car in for service", "Max to the vet", "the recycling out"],
    "finish": ["the blog post", "the homework", "chapter 3 of the book", "the tax paperwork"],
    "update": ["my resume", "the project roadmap", "the shared budget sheet"],
    "get": ["a flu shot", "the car washed", "a new toothbrush", "cash for the market"],
}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["Jan", "Feb", "March", "April", "May", "June", "July", "Aug", "Sept", "Oct", "Nov", "Dec"]
TIMES = ["at 9am", "at 10:30am", "at noon", "at 3pm", "at 5pm", "at 6:30pm", "at 8pm"]

# Date phrases said as they are (no preposition); each may get a time (TIMES) when marked True.
PLAIN_DATES: list[tuple[str, bool]] = [
    ("today", True), ("tonight", False), ("tomorrow", True), ("tomorrow morning", False),
    ("tomorrow evening", False), ("the day after tomorrow", True), ("this weekend", False),
    ("next week", False), ("next month", False), ("end of day", False), ("this afternoon", False),
    ("every morning", False), ("every weekday", True), ("every other week", False),
    ("in 2 days", False), ("in 3 days", False), ("in 5 days", False), ("in a week", False),
    ("in 2 weeks", False), ("in an hour", False), ("in 30 minutes", False),
]
# Phrases built around a day name: "next Tuesday", "every Monday", "this Friday".
DAY_FORMS = ["next {day}", "this {day}", "every {day}", "{day}", "{day}", "{day}"]
# Prepositions a bare day or month date may carry; the due_string leaves them out.
DAY_PREPOSITIONS = ["on ", "by ", ""]
END_OF_MONTH = ("end of the month", ["by the ", "at the ", "by "])

# Todoist convention: 4 is urgent, 1 is normal. A request that says nothing gets 1.
DEFAULT_PRIORITY = 1
PRIORITY_PHRASES: dict[int, list[str]] = {
    4: ["it's urgent", "urgent", "ASAP", "top priority", "this is critical", "super urgent"],
    3: ["high priority", "it's important", "important", "fairly high priority"],
    2: ["medium priority", "moderately important", "mid priority"],
    1: ["low priority", "no rush", "not urgent", "whenever"],
}

LABELS = ["work", "home", "errands", "health", "finance", "family", "shopping", "personal",
          "school", "travel", "fitness", "car", "pets", "kids", "admin", "garden"]
# How a request names its labels: "{labels}" is "work", "work and home", "work, home and kids".
LABEL_FORMS = ["tag it {labels}", "label it {labels}", "labels: {labels}", "put it under {labels}",
               "file it under {labels}", "tags: {labels}", "{hashtags}"]

LEADS = ["remind me to {task}", "I need to {task}", "don't let me forget to {task}",
         "add a task to {task}", "add a task: {task}", "todo: {task}", "new task - {task}",
         "can you remind me to {task}", "I have to {task}", "make a note to {task}", "I should {task}",
         "{task}", "please add: {task}", "gotta {task}"]
FILLER_BEFORE = ["", "", "", "hey ", "hey so um ", "ok so ", "hi! ", "quick one: ", "um ", "so ", "yo ", "hmm "]
FILLER_AFTER = ["", "", "", " thanks!", " if you can", " thx", " please", " thank you", ", cheers",
                " if you don't mind", " :)"]
