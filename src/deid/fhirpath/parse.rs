//! Expressions parsed from their text: tokens, then precedence climbing.

use super::{Expr, Func, Item, Op};
use crate::fhir::model;

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(String),
    Date(String),
    Time(String),
    This,
    Sym(&'static str),
}

fn tokenize(src: &str) -> Result<Vec<Token>, String> {
    let mut lexer = Lexer {
        chars: src.chars().collect(),
        i: 0,
    };
    let mut tokens = Vec::new();
    while let Some(&c) = lexer.chars.get(lexer.i) {
        let token = match c {
            c if c.is_whitespace() => {
                lexer.i += 1;
                continue;
            }
            '\'' => Token::Str(lexer.string()?),
            '`' => Token::Ident(lexer.quoted_identifier()?),
            c if c.is_ascii_digit() => Token::Num(lexer.number()),
            '@' => lexer.temporal()?,
            c if c.is_alphabetic() || c == '_' => {
                Token::Ident(lexer.take_while(|ch| ch.is_alphanumeric() || ch == '_'))
            }
            '$' => lexer.variable()?,
            c => Token::Sym(lexer.symbol(c)?),
        };
        tokens.push(token);
    }
    Ok(tokens)
}

/// The text being tokenized and the position in it.
struct Lexer {
    chars: Vec<char>,
    i: usize,
}

impl Lexer {
    /// Characters from here while `keep` holds them.
    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let start = self.i;
        while self.chars.get(self.i).is_some_and(|&c| keep(c)) {
            self.i += 1;
        }
        self.chars[start..self.i].iter().collect()
    }

    /// A `'…'` literal, with its escapes.
    fn string(&mut self) -> Result<String, String> {
        let mut s = String::new();
        self.i += 1;
        loop {
            match self.chars.get(self.i) {
                None => return Err("an unterminated string".into()),
                Some('\'') => break,
                Some('\\') => {
                    let escaped = *self.chars.get(self.i + 1).ok_or("an unterminated string")?;
                    s.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        other => other,
                    });
                    self.i += 2;
                }
                Some(&ch) => {
                    s.push(ch);
                    self.i += 1;
                }
            }
        }
        self.i += 1;
        Ok(s)
    }

    fn quoted_identifier(&mut self) -> Result<String, String> {
        let end = self.chars[self.i + 1..]
            .iter()
            .position(|&ch| ch == '`')
            .ok_or("an unterminated `identifier`")?;
        let name = self.chars[self.i + 1..self.i + 1 + end].iter().collect();
        self.i += end + 2;
        Ok(name)
    }

    /// Digits, with a fraction when a digit follows the point.
    fn number(&mut self) -> String {
        let mut text = self.take_while(|c| c.is_ascii_digit());
        let fraction = self.chars.get(self.i) == Some(&'.')
            && self.chars.get(self.i + 1).is_some_and(char::is_ascii_digit);
        if fraction {
            self.i += 1;
            text.push('.');
            text.push_str(&self.take_while(|c| c.is_ascii_digit()));
        }
        text
    }

    /// `@2020-01-01`, `@2020-01-01T10:00:00Z` or `@T10:00`.
    fn temporal(&mut self) -> Result<Token, String> {
        self.i += 1;
        let text =
            self.take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '+'));
        match text.strip_prefix('T') {
            Some(time) => Ok(Token::Time(time.to_string())),
            None if !text.is_empty() => Ok(Token::Date(text)),
            None => Err("an empty @ literal".into()),
        }
    }

    /// `$this`, the only variable there is.
    fn variable(&mut self) -> Result<Token, String> {
        self.i += 1;
        let name = format!("${}", self.take_while(char::is_alphanumeric));
        if name != "$this" {
            return Err(format!("{name} is not supported"));
        }
        Ok(Token::This)
    }

    fn symbol(&mut self, c: char) -> Result<&'static str, String> {
        let two: String = self.chars[self.i..(self.i + 2).min(self.chars.len())]
            .iter()
            .collect();
        let sym = ["<=", ">=", "!="]
            .into_iter()
            .find(|s| *s == two)
            .or_else(|| {
                [
                    ".", "(", ")", "[", "]", ",", "|", "=", "<", ">", "+", "-", "*", "/", "&",
                ]
                .into_iter()
                .find(|s| s.starts_with(c))
            })
            .ok_or_else(|| format!("unexpected '{c}'"))?;
        self.i += sym.len();
        Ok(sym)
    }
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    /// Expressions open around the current one: bounded, so that no configuration can take
    /// the parser's (or the evaluator's) stack.
    depth: usize,
}

const MAX_DEPTH: usize = 64;
const MAX_TOKENS: usize = 500;

/// Parses an expression; `Err` says what is not supported.
pub fn parse(src: &str) -> Result<Expr, String> {
    let tokens = tokenize(src)?;
    // A long chain (`a.b.c…`, `1+1+…`) parses without recursion but makes a deep tree, which
    // evaluating walks recursively.
    if tokens.len() > MAX_TOKENS {
        return Err(format!("an expression of more than {MAX_TOKENS} tokens"));
    }
    let mut parser = Parser {
        tokens,
        at: 0,
        depth: 0,
    };
    let expr = parser.expr(0)?;
    if parser.at < parser.tokens.len() {
        return Err(format!("unexpected {:?}", parser.tokens[parser.at]));
    }
    Ok(expr)
}

/// Binary operators by precedence, loosest first (FHIRPath's table).
const LEVELS: &[&[(&str, Op)]] = &[
    &[("implies", Op::Implies)],
    &[("or", Op::Or), ("xor", Op::Xor)],
    &[("and", Op::And)],
    &[("in", Op::In), ("contains", Op::Contains)],
    &[("=", Op::Eq), ("!=", Op::Ne)],
    &[("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)],
    &[("|", Op::Union)],
    // `is` and `as` sit here (handled in `expr`).
    &[],
    &[("+", Op::Add), ("-", Op::Sub), ("&", Op::Concat)],
    &[
        ("*", Op::Mul),
        ("/", Op::Div),
        ("div", Op::IntDiv),
        ("mod", Op::Mod),
    ],
];

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn peek_word(&self) -> Option<&str> {
        match self.peek()? {
            Token::Ident(w) => Some(w),
            Token::Sym(s) => Some(s),
            _ => None,
        }
    }

    fn expect(&mut self, sym: &'static str) -> Result<(), String> {
        if self.peek() == Some(&Token::Sym(sym)) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected '{sym}'"))
        }
    }

    fn expr(&mut self, level: usize) -> Result<Expr, String> {
        if level > 0 {
            return self.expr_at(level);
        }
        self.nested(|parser| parser.expr_at(0))
    }

    fn nested(
        &mut self,
        parse: impl FnOnce(&mut Parser) -> Result<Expr, String>,
    ) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("expressions nest more than {MAX_DEPTH} deep"));
        }
        let parsed = parse(self);
        self.depth -= 1;
        parsed
    }

    fn expr_at(&mut self, level: usize) -> Result<Expr, String> {
        if level == LEVELS.len() {
            return self.unary();
        }
        let mut left = self.expr_at(level + 1)?;
        loop {
            if LEVELS[level].is_empty() {
                // `x is T`, `x as T`
                match self.peek_word() {
                    Some(w @ ("is" | "as")) if matches!(self.peek(), Some(Token::Ident(_))) => {
                        let is = w == "is";
                        self.at += 1;
                        let ty = self.type_name()?;
                        left = if is {
                            Expr::Is(Box::new(left), ty)
                        } else {
                            Expr::As(Box::new(left), ty)
                        };
                        continue;
                    }
                    _ => return Ok(left),
                }
            }
            let Some(word) = self.peek_word() else {
                return Ok(left);
            };
            let Some(&(_, op)) = LEVELS[level].iter().find(|(w, _)| *w == word) else {
                return Ok(left);
            };
            self.at += 1;
            let right = self.expr_at(level + 1)?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn type_name(&mut self) -> Result<String, String> {
        let mut name = match self.peek() {
            Some(Token::Ident(n)) => n.clone(),
            _ => return Err("expected a type name".into()),
        };
        self.at += 1;
        // `FHIR.Quantity` / `System.String`: the namespace adds nothing here.
        if (name == "FHIR" || name == "System") && self.peek() == Some(&Token::Sym(".")) {
            self.at += 1;
            name = match self.peek() {
                Some(Token::Ident(n)) => n.clone(),
                _ => return Err("expected a type name".into()),
            };
            self.at += 1;
        }
        if !model::is_type(&name) {
            return Err(format!("'{name}' is not an R4 type"));
        }
        Ok(name)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek() == Some(&Token::Sym("-")) {
            self.at += 1;
            let operand = self.nested(Parser::unary)?;
            return Ok(Expr::Negate(Box::new(operand)));
        }
        if self.peek() == Some(&Token::Sym("+")) {
            self.at += 1;
        }
        let mut expr = self.term()?;
        loop {
            match self.peek() {
                Some(Token::Sym(".")) => {
                    self.at += 1;
                    let Some(Token::Ident(name)) = self.peek().cloned() else {
                        return Err("expected a name after '.'".into());
                    };
                    self.at += 1;
                    expr = if self.peek() == Some(&Token::Sym("(")) {
                        self.call(Some(expr), &name)?
                    } else {
                        Expr::Child(Box::new(expr), name)
                    };
                }
                Some(Token::Sym("[")) => {
                    self.at += 1;
                    let index = self.expr(0)?;
                    self.expect("]")?;
                    expr = Expr::Index(Box::new(expr), Box::new(index));
                }
                _ => return Ok(expr),
            }
        }
    }

    fn term(&mut self) -> Result<Expr, String> {
        let token = self.peek().cloned().ok_or("the expression ends early")?;
        self.at += 1;
        Ok(match token {
            Token::Str(s) => Expr::Literal(Item::Str(s)),
            Token::Num(n) if n.contains('.') => {
                Expr::Literal(Item::Dec(n.parse().map_err(|_| "a bad number")?))
            }
            Token::Num(n) => Expr::Literal(Item::Int(n.parse().map_err(|_| "a bad number")?)),
            Token::Date(d) => Expr::Literal(Item::Date(d)),
            Token::Time(t) => Expr::Literal(Item::Time(t)),
            Token::This => Expr::This,
            Token::Sym("(") => {
                let inner = self.expr(0)?;
                self.expect(")")?;
                inner
            }
            Token::Ident(w) if w == "true" || w == "false" => {
                Expr::Literal(Item::Bool(w == "true"))
            }
            Token::Ident(name) => {
                if self.peek() == Some(&Token::Sym("(")) {
                    self.call(None, &name)?
                } else {
                    Expr::Name(name)
                }
            }
            Token::Sym(s) => return Err(format!("unexpected '{s}'")),
        })
    }

    fn call(&mut self, target: Option<Expr>, name: &str) -> Result<Expr, String> {
        let (func, min, max) =
            Func::named(name).ok_or_else(|| format!("the function {name}() is not supported"))?;
        self.expect("(")?;
        let mut args = Vec::new();
        if self.peek() != Some(&Token::Sym(")")) {
            loop {
                if func.takes_type() {
                    args.push(Expr::Literal(Item::Str(self.type_name()?)));
                } else {
                    args.push(self.expr(0)?);
                }
                if self.peek() == Some(&Token::Sym(",")) {
                    self.at += 1;
                } else {
                    break;
                }
            }
        }
        self.expect(")")?;
        if args.len() < min || args.len() > max {
            return Err(format!("{name}() takes {min} to {max} arguments"));
        }
        if func == Func::NodesByType {
            match &args[0] {
                Expr::Literal(Item::Str(ty)) if model::is_type(ty) => {}
                Expr::Literal(Item::Str(ty)) => return Err(format!("'{ty}' is not an R4 type")),
                _ => return Err("nodesByType() takes a type name in quotes".into()),
            }
        }
        Ok(Expr::Call(target.map(Box::new), func, args))
    }
}
