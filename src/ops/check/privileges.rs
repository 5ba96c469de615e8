//! Row-Level Security holds for every role the served user can become:
//! tables without it, owners, superusers, BYPASSRLS, the key table, large
//! objects.

use std::collections::HashSet;

use super::*;

/// Predefined roles whose privileges reach past every grant, and what they
/// give a session that has them.
pub(super) const PREDEFINED: [(&str, &str); 5] = [
    (
        "pg_read_all_data",
        "which reads every table whatever its grants: auth.signing_keys, and so any user's \
         claims, and every table without row-level security",
    ),
    (
        "pg_write_all_data",
        "which writes every table whatever its grants: auth.signing_keys, and so any user's \
         claims, and every table without row-level security",
    ),
    (
        "pg_read_server_files",
        "which reads the server's files as its operating-system user",
    ),
    (
        "pg_write_server_files",
        "which writes the server's files as its operating-system user",
    ),
    (
        "pg_execute_server_program",
        "which runs programs on the server as its operating-system user",
    ),
];

/// The functions that create a large object.
pub(super) const LARGE_OBJECT_CREATORS: [&str; 5] = [
    "lo_create(oid)",
    "lo_creat(integer)",
    "lo_from_bytea(oid, bytea)",
    "lo_import(text)",
    "lo_import(text, oid)",
];

/// A role whose privileges sessions of the served user can use: the user
/// itself, or a role it can SET ROLE to or inherits the privileges of.
#[derive(Clone)]
pub(super) struct Reach {
    /// The role as the first argument of the privilege functions.
    sql: String,
    /// Quoted as an identifier, as it is written in SQL.
    name: String,
    /// The roles between the user and this one, for messages.
    through: String,
    /// The role granted to the user that leads here.
    first: String,
    can_set: bool,
    superuser: bool,
    bypassrls: bool,
}

impl Reach {
    pub(super) fn user(user: &str) -> Reach {
        Reach {
            sql: "session_user".to_owned(),
            name: user.to_owned(),
            through: String::new(),
            first: user.to_owned(),
            can_set: true,
            superuser: false,
            bypassrls: false,
        }
    }

    pub(super) fn is_user(&self) -> bool {
        self.sql == "session_user"
    }

    /// How the served user comes by this role: "authenticated can SET ROLE
    /// service_role (through ops)".
    pub(super) fn how(&self, user: &str) -> String {
        let verb = if self.can_set {
            "can SET ROLE"
        } else {
            "has the privileges of"
        };
        format!("{user} {verb} {}{}", self.name, self.through())
    }

    pub(super) fn through(&self) -> String {
        if self.through.is_empty() {
            String::new()
        } else {
            format!(" (through {})", self.through)
        }
    }

    /// Who holds a privilege, as the subject of "has SELECT on it".
    pub(super) fn holder(&self, user: &str) -> String {
        if self.is_user() {
            user.to_owned()
        } else {
            format!("{}, which", self.how(user))
        }
    }

    /// The grant to revoke to cut the way to this role.
    pub(super) fn revoke(&self, user: &str) -> String {
        format!("revoke {} from {user}", self.first)
    }
}

/// The findings about one served user, each reported once however many of
/// the roles it can use lead to it.
pub(super) struct Escapes<'a> {
    report: &'a mut Report,
    subject: &'a str,
    user: &'a str,
    seen: HashSet<String>,
    clean: bool,
}

impl Escapes<'_> {
    pub(super) fn fail(&mut self, key: String, message: String) {
        self.clean = false;
        if self.seen.insert(key) {
            self.report.fail(self.subject, message);
        }
    }

    pub(super) fn warn(&mut self, key: String, message: String) {
        self.clean = false;
        if self.seen.insert(key) {
            self.report.warn(self.subject, message);
        }
    }
}

/// What RLS leaves open to the session's user, and to every role it can
/// become or inherits from.
pub(super) async fn check_privileges(
    session: &mut Session,
    subject: &str,
    user: &str,
    report: &mut Report,
) -> Result<(), SessionError> {
    let row = session
        .one(
            "select r.rolsuper, r.rolbypassrls \
               from pg_catalog.pg_roles r where r.rolname = session_user",
        )
        .await?;
    let mut escapes = Escapes {
        report,
        subject,
        user,
        seen: HashSet::new(),
        clean: true,
    };
    if is_true(&row[0]) {
        escapes.fail(
            "superuser".to_owned(),
            format!("{user} is a superuser: RLS does not apply to it, and it can forge claims"),
        );
    } else if is_true(&row[1]) {
        escapes.fail(
            "bypassrls".to_owned(),
            format!(
                "{user} has BYPASSRLS: no policy applies to it (alter role {user} nobypassrls)"
            ),
        );
    }
    let roles = reachable_roles(session).await?;
    for reach in std::iter::once(Reach::user(user)).chain(roles.iter().cloned()) {
        if !reach.is_user() {
            judge_role(&mut escapes, &reach);
        }
        // Privileges of a role the user only inherits from are already
        // the user's own.
        if reach.is_user() || reach.can_set {
            check_key_table(session, &mut escapes, &reach).await?;
            let tables = reachable_tables(session, &reach.sql).await?;
            judge_tables(&mut escapes, &reach, tables);
        }
    }
    if escapes.clean {
        let mut message = format!("row-level security covers every table {user} can reach");
        if !roles.is_empty() {
            let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
            message.push_str(&format!(
                ", also through the roles it can become or inherits from ({})",
                names.join(", ")
            ));
        }
        escapes.report.ok(subject, message);
    }
    check_large_objects(session, subject, user, report).await
}

/// The roles the session's user is a member of, directly or through a
/// chain, that it can SET ROLE to or inherits the privileges of. Before
/// PostgreSQL 16 membership is the right to SET ROLE; since, a grant says
/// so with its SET option.
pub(super) async fn reachable_roles(session: &mut Session) -> Result<Vec<Reach>, SessionError> {
    let version = session
        .one("select pg_catalog.current_setting('server_version_num')")
        .await?;
    let version: u32 = text(&version[0])
        .parse()
        .map_err(|_| SessionError::NoServerVersion)?;
    let set = if version >= 160_000 { "SET" } else { "MEMBER" };
    // Circular grants are refused by Postgres; the depth bound is a fuse.
    let sql = format!(
        "with recursive chain(oid, path, depth) as ( \
             select m.roleid, array[]::pg_catalog.text[], 1 \
               from pg_catalog.pg_auth_members m \
              where m.member = (select oid from pg_catalog.pg_roles \
                                  where rolname = session_user) \
           union all \
             select m.roleid, \
                    pg_catalog.array_append(c.path, \
                      pg_catalog.quote_ident(r.rolname) collate pg_catalog.\"default\"), \
                    c.depth + 1 \
               from chain c \
               join pg_catalog.pg_auth_members m on m.member = c.oid \
               join pg_catalog.pg_roles r on r.oid = c.oid \
              where c.depth < 16), \
         shortest as ( \
             select distinct on (oid) oid, path from chain order by oid, depth) \
         select r.oid, pg_catalog.quote_ident(r.rolname), \
                pg_catalog.array_to_string(s.path, ', '), \
                coalesce(s.path[1], pg_catalog.quote_ident(r.rolname)), \
                pg_catalog.pg_has_role(session_user, r.oid, '{set}'), \
                r.rolsuper, r.rolbypassrls \
           from shortest s join pg_catalog.pg_roles r on r.oid = s.oid \
          where pg_catalog.pg_has_role(session_user, r.oid, '{set}') \
             or pg_catalog.pg_has_role(session_user, r.oid, 'USAGE') \
          order by 2"
    );
    let rows = session.query(&sql).await?;
    Ok(rows
        .into_iter()
        .map(|row| Reach {
            sql: format!("{}::pg_catalog.oid", text(&row[0])),
            name: text(&row[1]),
            through: text(&row[2]),
            first: text(&row[3]),
            can_set: is_true(&row[4]),
            superuser: is_true(&row[5]),
            bypassrls: is_true(&row[6]),
        })
        .collect())
}

/// The attributes of a role the user can become, and the predefined roles
/// whose privileges reach past every grant.
pub(super) fn judge_role(escapes: &mut Escapes<'_>, reach: &Reach) {
    let user = escapes.user;
    let (how, revoke) = (reach.how(user), reach.revoke(user));
    // Attributes are not inherited: only SET ROLE gives them.
    if reach.can_set && reach.superuser {
        escapes.fail(
            format!("superuser {}", reach.name),
            format!(
                "{how}, which is a superuser: RLS does not apply to it, and it can forge \
                 claims ({revoke})"
            ),
        );
    } else if reach.can_set && reach.bypassrls {
        escapes.fail(
            format!("bypassrls {}", reach.name),
            format!(
                "{how}, which has BYPASSRLS: after set role {} no policy applies ({revoke}, or \
                 alter role {} nobypassrls)",
                reach.name, reach.name
            ),
        );
    }
    if let Some((_, what)) = PREDEFINED.iter().find(|(name, _)| *name == reach.name) {
        escapes.fail(
            format!("predefined {}", reach.name),
            format!("{how}, {what} ({revoke})"),
        );
    }
}

/// Whether the role can read `auth.signing_keys` or is a member of its
/// owner, either of which lets a session forge claims.
pub(super) async fn check_key_table(
    session: &mut Session,
    escapes: &mut Escapes<'_>,
    reach: &Reach,
) -> Result<(), SessionError> {
    let role = &reach.sql;
    let row = session
        .one(&format!(
            "select coalesce(pg_catalog.has_table_privilege({role}, \
                      pg_catalog.to_regclass('auth.signing_keys'), 'SELECT'), false) \
                 or coalesce(pg_catalog.pg_has_role({role}, \
                      (select relowner from pg_catalog.pg_class \
                        where oid = \
                              pg_catalog.to_regclass('auth.signing_keys')), 'MEMBER'), false)"
        ))
        .await?;
    if is_true(&row[0]) {
        let fix = if reach.is_user() {
            "serve a role that is not the owner of schema auth nor a member of it".to_owned()
        } else {
            reach.revoke(escapes.user)
        };
        escapes.fail(
            "signing keys".to_owned(),
            format!(
                "{} can read auth.signing_keys, and so forge any user's claims: {fix}",
                reach.holder(escapes.user)
            ),
        );
    }
    Ok(())
}

/// A table the role holds a privilege on, in a schema it can use.
pub(super) struct TableAccess {
    name: String,
    rls: bool,
    forced: bool,
    owner: bool,
    privileges: String,
}

/// Tables in schemas the role can use, that it holds a privilege on, with
/// what RLS does about them.
pub(super) async fn reachable_tables(
    session: &mut Session,
    role: &str,
) -> Result<Vec<TableAccess>, SessionError> {
    let rows = session
        .query(&format!(
            "with reachable as ( \
               select pg_catalog.quote_ident(n.nspname) operator(pg_catalog.||) '.' \
                        operator(pg_catalog.||) pg_catalog.quote_ident(c.relname) as name, \
                      c.relrowsecurity as rls, c.relforcerowsecurity as forced, \
                      pg_catalog.pg_has_role({role}, c.relowner, 'MEMBER') as owner, \
                      pg_catalog.array_to_string(array( \
                        select p from pg_catalog.unnest( \
                          array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p \
                         where pg_catalog.has_table_privilege({role}, c.oid, p)), ', ') \
                        as privileges, \
                      pg_catalog.has_any_column_privilege({role}, c.oid, \
                        'SELECT, INSERT, UPDATE, REFERENCES') as columns \
                 from pg_catalog.pg_class c \
                 join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
                where c.relkind in ('r', 'p') \
                  and n.nspname not in ('pg_catalog', 'information_schema', 'auth') \
                  and n.nspname !~ '^pg_(toast|temp_)' \
                  and pg_catalog.has_schema_privilege({role}, n.oid, 'USAGE')) \
             select name, rls, forced, owner, privileges from reachable \
              where privileges <> '' or columns \
              order by name"
        ))
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| TableAccess {
            name: text(&row[0]),
            rls: is_true(&row[1]),
            forced: is_true(&row[2]),
            owner: is_true(&row[3]),
            privileges: match text(&row[4]) {
                p if p.is_empty() => "column privileges".to_owned(),
                p => p,
            },
        })
        .collect())
}

pub(super) fn judge_tables(escapes: &mut Escapes<'_>, reach: &Reach, tables: Vec<TableAccess>) {
    let user = escapes.user;
    let holder = reach.holder(user);
    for table in tables {
        let (name, privileges) = (&table.name, &table.privileges);
        if !table.rls {
            escapes.fail(
                format!("no rls {name}"),
                format!(
                    "table {name} has row-level security disabled, and {holder} has \
                     {privileges} on it: every user sees all its rows. Enable it (alter table \
                     {name} enable row level security) and add policies, or revoke the grant"
                ),
            );
        } else if table.owner && !table.forced {
            let owner = if reach.is_user() {
                format!("{user} (or a role it is a member of)")
            } else {
                format!(
                    "{} (or a role it is a member of), which {user} can SET ROLE to{}",
                    reach.name,
                    reach.through()
                )
            };
            escapes.fail(
                format!("owner {name}"),
                format!(
                    "table {name} is owned by {owner}, and owners bypass its policies: change \
                     its owner, or alter table {name} force row level security"
                ),
            );
        } else if privileges.contains("TRUNCATE") {
            escapes.warn(
                format!("truncate {name}"),
                format!(
                    "{holder} may TRUNCATE table {name}, which row-level security does not \
                     cover: one user can empty it for all (revoke truncate on {name} from {})",
                    reach.name
                ),
            );
        }
    }
}

/// Large objects belong to the role that creates them, here the login role
/// every user of the proxy shares, and no policy covers them: one user can
/// read, change or unlink another's.
pub(super) async fn check_large_objects(
    session: &mut Session,
    subject: &str,
    user: &str,
    report: &mut Report,
) -> Result<(), SessionError> {
    let creators: Vec<String> = LARGE_OBJECT_CREATORS
        .iter()
        .map(|f| {
            format!(
                "case when coalesce(pg_catalog.has_function_privilege(session_user, \
                   pg_catalog.to_regprocedure('pg_catalog.{f}'), 'EXECUTE'), false) \
                 then 'pg_catalog.{f}' end"
            )
        })
        .collect();
    let row = session
        .one(&format!(
            "select pg_catalog.concat_ws(', ', {}), \
                    pg_catalog.current_setting('lo_compat_privileges'), \
                    (select pg_catalog.count(*) from pg_catalog.pg_largeobject_metadata \
                      where pg_catalog.pg_has_role(session_user, lomowner, 'USAGE'))",
            creators.join(", ")
        ))
        .await?;
    let (creators, compat, owned) = (text(&row[0]), text(&row[1]), text(&row[2]));
    if !creators.is_empty() {
        report.warn(
            subject,
            format!(
                "{user} can create large objects, which belong to {user} and so to every user \
                 of it: one reads, changes or deletes another's (lo_get, lo_put, lo_unlink). \
                 Unless the application uses them: revoke execute on function {creators} \
                 from public, {user}"
            ),
        );
    }
    if owned != "0" && !owned.is_empty() {
        report.warn(
            subject,
            format!(
                "{user} owns {owned} large object(s): every user of it can read, change and \
                 delete them (lo_unlink the ones no longer needed)"
            ),
        );
    }
    if compat == "on" {
        report.warn(
            subject,
            "lo_compat_privileges is on: every role reads and writes every large object, \
             whoever owns it (alter system set lo_compat_privileges = off)",
        );
    }
    Ok(())
}
